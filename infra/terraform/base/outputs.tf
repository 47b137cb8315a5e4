output "bucket_url" {
  description = "Use as job.output's prefix: gs://<bucket>/runs/<job>."
  value       = "gs://${google_storage_bucket.shards.name}"
}

output "repository_url" {
  description = "Push the images here: <url>/teacher:<tag>."
  value       = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "service_account_email" {
  description = "VmSpec.service_account_email."
  value       = google_service_account.teacher.email
}

output "network" {
  description = "VmSpec.network."
  value       = google_compute_network.teacher.name
}

output "subnetwork" {
  description = "VmSpec.subnetwork."
  value       = google_compute_subnetwork.teacher.name
}
