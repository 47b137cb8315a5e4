# Long-lived infrastructure for distill's cloud teacher: the shard bucket, the container
# registry, the network the teacher VMs use, and the job's least-privilege service account.
#   terraform -chdir=infra/terraform/base init
#   terraform -chdir=infra/terraform/base apply -var project=P -var bucket_name=B

locals {
  # distill/cloud/batch.py: REQUIRED_APIS (a test keeps the two in step)
  apis = [
    "artifactregistry.googleapis.com",
    "batch.googleapis.com",
    "compute.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "storage.googleapis.com",
  ]
}

resource "google_project_service" "apis" {
  for_each           = toset(local.apis)
  service            = each.value
  disable_on_destroy = false
}

# --- The shard bucket -----------------------------------------------------------------------

resource "google_storage_bucket" "shards" {
  #checkov:skip=CKV_GCP_62:Access logs would add a second bucket; Cloud Audit Logs record admin access, and objects are public-access-prevented.
  name                        = var.bucket_name
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age            = var.runs_retention_days
      matches_prefix = ["runs/"]
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

# --- The container registry -----------------------------------------------------------------

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images hold public code and no data; Google-managed encryption instead of a customer-managed key.
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "distill teacher and student images"

  docker_config {
    immutable_tags = true
  }

  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "1209600s"
    }
  }

  # Every tree change is a new content-hashed tag: keep the newest var.keep_images versions and
  # delete older ones after 30 days (a KEEP policy wins over a DELETE policy).
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "2592000s"
    }
  }

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = var.keep_images
    }
  }

  depends_on = [google_project_service.apis]
}

# --- The network: no ingress rule at all (a custom VPC denies ingress by default) -------------

resource "google_compute_network" "teacher" {
  name                    = var.network_name
  auto_create_subnetworks = false

  depends_on = [google_project_service.apis]
}

# Stated explicitly: nothing reaches the teacher VMs (no SSH; logs go to Cloud Logging).
resource "google_compute_firewall" "deny_all_ingress" {
  name          = "${var.network_name}-deny-all-ingress"
  network       = google_compute_network.teacher.name
  direction     = "INGRESS"
  priority      = 65534
  source_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }
}

resource "google_compute_subnetwork" "teacher" {
  name                     = "${var.network_name}-${var.region}"
  region                   = var.region
  network                  = google_compute_network.teacher.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.1
    metadata             = "EXCLUDE_ALL_METADATA"
  }
}

# --- Egress only: Cloud NAT for the Batch tasks' NVIDIA driver -----------------------------------
# The VMs have no external IP. Google's APIs (the bucket, Artifact Registry, Cloud Logging) are
# reached through Private Google Access; the single VM's driver comes from Google too (COS's
# cos-extensions). A Batch task's VM (batch-debian) downloads its driver from NVIDIA's servers,
# which only NAT reaches. NAT carries connections the VMs open; nothing can connect in.
# Cost (docs/CLOUD.md, "What the network costs"): $0.0014 per VM-hour (at most $0.044/h) and
# $0.045 per GiB processed, about 0.5 GiB of driver per VM boot.

resource "google_compute_router" "teacher" {
  count   = var.nat ? 1 : 0
  name    = "${var.network_name}-${var.region}"
  region  = var.region
  network = google_compute_network.teacher.id
}

resource "google_compute_router_nat" "teacher" {
  count                              = var.nat ? 1 : 0
  name                               = "${var.network_name}-${var.region}-nat"
  router                             = google_compute_router.teacher[0].name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.teacher.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# --- The job's service account and its roles -------------------------------------------------

resource "google_service_account" "teacher" {
  account_id   = var.service_account_id
  display_name = "distill teacher job"
  description  = "Runs the teacher container: reads inputs, writes shards under runs/, pulls images, writes logs."

  depends_on = [google_project_service.apis]
}

# Create-only writes (the teacher never overwrites or deletes), and only under runs/.
resource "google_storage_bucket_iam_member" "teacher_creates_runs" {
  bucket = google_storage_bucket.shards.name
  role   = "roles/storage.objectCreator"
  member = "serviceAccount:${google_service_account.teacher.email}"

  condition {
    title      = "runs-prefix-only"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.shards.name}/objects/runs/\")"
  }
}

# Read and list: resume needs the shards already written; the VM stages its inputs.
resource "google_storage_bucket_iam_member" "teacher_reads" {
  bucket = google_storage_bucket.shards.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.teacher.email}"
}

resource "google_artifact_registry_repository_iam_member" "teacher_pulls" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.teacher.email}"
}

resource "google_project_iam_member" "teacher_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.teacher.email}"
}

# A Batch task's VM reports to Batch as the job's service account; without this role Batch fails
# the job ("No VM has agent reporting correctly within time window").
resource "google_project_iam_member" "teacher_batch_agent" {
  project = var.project
  role    = "roles/batch.agentReporter"
  member  = "serviceAccount:${google_service_account.teacher.email}"
}

# A gated or private hf: teacher: the first VM reads the Hub token from this one secret
# (distill/cloud/checkpoint_copy.py), never from metadata, the job file or the image.
resource "google_project_service" "secretmanager" {
  count              = var.hf_token_secret == "" ? 0 : 1
  service            = "secretmanager.googleapis.com"
  disable_on_destroy = false
}

resource "google_secret_manager_secret_iam_member" "teacher_reads_hf_token" {
  count     = var.hf_token_secret == "" ? 0 : 1
  project   = var.project
  secret_id = var.hf_token_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.teacher.email}"

  depends_on = [google_project_service.secretmanager]
}

# The VM deletes itself when its teacher ends (distill/cloud/scripts/startup.sh), so it never outlives
# the job even if the controller died (a stopped VM would keep its disk billed, and
# maxRunDuration does not act on a stopped VM). Just that permission, and only on
# instances and boot disks named distill-teacher-*.
resource "google_project_iam_custom_role" "teacher_self_delete" {
  project     = var.project
  role_id     = "distillTeacherSelfDelete"
  title       = "distill teacher VM deletes itself"
  description = "Lets a distill teacher VM delete its own instance and boot disk when its job ends."
  permissions = ["compute.instances.delete", "compute.disks.delete"]
}

resource "google_project_iam_member" "teacher_self_delete" {
  project = var.project
  role    = google_project_iam_custom_role.teacher_self_delete.id
  member  = "serviceAccount:${google_service_account.teacher.email}"

  condition {
    title      = "distill-teacher-vms-only"
    expression = "(resource.type == \"compute.googleapis.com/Instance\" && resource.name.extract(\"/instances/{name}\").startsWith(\"distill-teacher-\")) || (resource.type == \"compute.googleapis.com/Disk\" && resource.name.extract(\"/disks/{name}\").startsWith(\"distill-teacher-\"))"
  }
}

# Who may start a VM that runs as the job's service account.
resource "google_service_account_iam_member" "launchers" {
  for_each           = toset(var.launchers)
  service_account_id = google_service_account.teacher.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}
