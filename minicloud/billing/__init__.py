"""Metering, prices, the hash-chained ledger and invoices (issue #14; docs/billing.md)."""
