terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source = "hashicorp/google"
      # scheduling.max_run_duration is GA from 5.36; 6.x and 7.x are tested by CI's fmt only.
      version = ">= 6.0, < 8.0"
    }
  }
}

provider "google" {
  project = var.project
}
