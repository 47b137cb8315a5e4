output "instance_id" {
  description = "The VM's numeric id."
  value       = google_compute_instance.teacher.instance_id
}

output "self_link" {
  description = "The VM's URL."
  value       = google_compute_instance.teacher.self_link
}

output "zone" {
  description = "The zone it runs in."
  value       = google_compute_instance.teacher.zone
}
