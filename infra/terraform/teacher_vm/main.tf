# The teacher VM, rendered from distill/cloud/spec.py:
#   VmSpec.write_tfvars(Path("infra/terraform/teacher_vm/terraform.tfvars.json"))
#   terraform -chdir=infra/terraform/teacher_vm apply
# tests/test_vm_spec.py checks that each attribute is wired to the variable that carries the
# spec's field, so this file, the Compute API request and the gcloud command agree.

resource "google_compute_instance" "teacher" {
  #checkov:skip=CKV_GCP_38:Boot disk holds the OS, the container and public weights for hours; Google-managed encryption, no CSEK to lose.
  #checkov:skip=CKV_GCP_40:access_config exists only when var.external_ip is true; VmSpec defaults to false (Private Google Access).
  name         = var.name
  project      = var.project
  zone         = var.zone
  machine_type = var.machine_type
  labels       = var.labels
  # The hardening keys win over anything in var.metadata (whose validation also asks for them).
  metadata = merge(var.metadata, {
    "block-project-ssh-keys" = "TRUE"
    "enable-oslogin"         = "TRUE"
    "serial-port-enable"     = "FALSE"
  })

  guest_accelerator {
    type  = var.accelerator_type
    count = var.accelerator_count
  }

  scheduling {
    provisioning_model          = var.provisioning_model
    preemptible                 = var.provisioning_model == "SPOT"
    instance_termination_action = var.instance_termination_action
    on_host_maintenance         = var.on_host_maintenance
    automatic_restart           = var.automatic_restart

    max_run_duration {
      seconds = var.max_run_duration_seconds
    }
  }

  boot_disk {
    auto_delete = true

    initialize_params {
      image = var.boot_image
      size  = var.boot_disk_size_gb
      type  = var.boot_disk_type
    }
  }

  network_interface {
    network            = var.network
    subnetwork         = var.subnetwork
    subnetwork_project = var.project

    dynamic "access_config" {
      for_each = var.external_ip ? [1] : []
      content {}
    }
  }

  service_account {
    email  = var.service_account_email
    scopes = var.scopes
  }

  shielded_instance_config {
    enable_secure_boot          = var.shielded_secure_boot
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }
}
