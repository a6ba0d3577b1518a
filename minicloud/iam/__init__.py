"""Identity and access. Today: API keys (bearer tokens) whose holders act as the cluster admin; the IAM issue adds
users, projects, roles and policies on top of the same principal/authorize seam."""
