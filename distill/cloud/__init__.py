"""Running the teacher on Google Cloud: the VM spec and its renderings (API, Terraform,
gcloud). Provisioning, watching and teardown build on :mod:`distill.cloud.spec`."""
