# Every value comes from distill/cloud/spec.py (VmSpec.tfvars -> terraform.tfvars.json), so
# no variable has a default: the spec is the one place the VM is described.

variable "project" {
  description = "Project the VM runs in."
  type        = string
}

variable "zone" {
  description = "Zone of this attempt (the tool fails over across the spec's zones)."
  type        = string
}

variable "name" {
  description = "Instance name."
  type        = string

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", var.name))
    error_message = "The name must be 1-63 characters of [a-z0-9-], starting with a letter."
  }
}

variable "machine_type" {
  description = "Machine type, g2-standard-8 (one L4)."
  type        = string
}

variable "accelerator_type" {
  description = "GPU type, nvidia-l4."
  type        = string
}

variable "accelerator_count" {
  description = "GPUs per VM."
  type        = number
}

variable "provisioning_model" {
  description = "SPOT or STANDARD."
  type        = string

  validation {
    condition     = contains(["SPOT", "STANDARD"], var.provisioning_model)
    error_message = "The provisioning model must be SPOT or STANDARD."
  }
}

variable "instance_termination_action" {
  description = "What preemption and max_run_duration do to the VM: DELETE or STOP."
  type        = string

  validation {
    condition     = contains(["DELETE", "STOP"], var.instance_termination_action)
    error_message = "The termination action must be DELETE or STOP."
  }
}

variable "max_run_duration_seconds" {
  description = "Dead-man switch: the VM is terminated after this many seconds of running."
  type        = number

  validation {
    condition     = var.max_run_duration_seconds >= 30 && var.max_run_duration_seconds <= 10368000
    error_message = "The max run duration must be between 30 seconds and 120 days."
  }
}

variable "on_host_maintenance" {
  description = "TERMINATE: GPU VMs cannot live-migrate."
  type        = string
}

variable "automatic_restart" {
  description = "Restart after a crash or preemption (false: the tool decides)."
  type        = bool
}

variable "boot_image" {
  description = "Boot image: a Container-Optimized OS image family (the startup script installs the NVIDIA driver with cos-extensions)."
  type        = string
}

variable "boot_disk_size_gb" {
  description = "Boot disk size in GB."
  type        = number
}

variable "boot_disk_type" {
  description = "Boot disk type (pd-balanced)."
  type        = string
}

variable "service_account_email" {
  description = "The job's least-privilege service account (infra/terraform/base)."
  type        = string
}

variable "scopes" {
  description = "OAuth scopes; cloud-platform, with IAM roles deciding what is allowed."
  type        = list(string)
}

variable "network" {
  description = "VPC network name."
  type        = string
}

variable "subnetwork" {
  description = "Subnetwork name, in the zone's region."
  type        = string
}

variable "external_ip" {
  description = "Give the VM an ephemeral external IP (false: Private Google Access only)."
  type        = bool
}

variable "shielded_secure_boot" {
  description = "Shielded VM Secure Boot (vTPM and integrity monitoring are always on)."
  type        = bool
}

variable "labels" {
  description = "Labels, distill-job=<job> and managed-by=distill among them."
  type        = map(string)
}

variable "metadata" {
  description = "Instance metadata: startup-script, distill-job, distill-image, hardening keys."
  type        = map(string)

  validation {
    condition = alltrue([
      for k, v in { "block-project-ssh-keys" = "TRUE", "enable-oslogin" = "TRUE", "serial-port-enable" = "FALSE" } :
      lookup(var.metadata, k, "") == v
    ])
    error_message = "The metadata must block project SSH keys, enable OS Login and disable the serial port."
  }
}
