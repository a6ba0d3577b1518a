"""Identity and access: users and service accounts, API keys and access keys, passwords and sessions, roles,
bindings and the policy that decides (``policy.evaluate``), rate limits, the audit log and the key store."""
