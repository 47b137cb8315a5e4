variable "project" {
  description = "Project that holds the bucket, the registry, the network and the job's service account."
  type        = string
}

variable "region" {
  description = "Region of the bucket, the registry and the subnet; the teacher VM's zones are in it."
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "Globally unique bucket name for shards (gs://<bucket>/runs/<job>/...)."
  type        = string
}

variable "runs_retention_days" {
  description = "Objects under runs/ are deleted this many days after creation."
  type        = number
  default     = 30

  validation {
    condition     = var.runs_retention_days >= 1
    error_message = "Keep runs at least one day."
  }
}

variable "noncurrent_retention_days" {
  description = "Overwritten or deleted object versions are kept this many days."
  type        = number
  default     = 7
}

variable "repository_id" {
  description = "Artifact Registry Docker repository for the teacher and student images."
  type        = string
  default     = "distill"
}

variable "keep_images" {
  description = "Artifact Registry keeps this many most recent image versions per image; older ones are deleted after 30 days."
  type        = number
  default     = 5
}

variable "service_account_id" {
  description = "Account id of the teacher job's service account."
  type        = string
  default     = "distill-teacher"
}

variable "launchers" {
  description = "Principals allowed to start VMs as the job's service account (e.g. user:me@example.com)."
  type        = list(string)
  default     = []
}

variable "network_name" {
  description = "VPC for the teacher VMs: no ingress, Private Google Access for the APIs."
  type        = string
  default     = "distill"
}

variable "subnet_cidr" {
  description = "Address range of the teacher subnet."
  type        = string
  default     = "10.42.0.0/24"
}

variable "nat" {
  description = "Cloud NAT (egress only) for the teacher subnet: the Batch fan-out's VMs download the NVIDIA driver through it. false: the single-VM path only."
  type        = bool
  default     = true
}

variable "hf_token_secret" {
  description = "For a gated or private Hugging Face teacher (teacher.model = \"hf:ORG/NAME\"): the name of a Secret Manager secret in this project that holds a Hub token (create it with `gcloud secrets create NAME --data-file=-`). The teacher's service account may read that one secret; set the job's cloud.hf_token_secret to the same name. Empty: no secret access."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{0,255}$", var.hf_token_secret))
    error_message = "hf_token_secret is a secret's name (letters, digits, - and _), not its path or value."
  }
}
