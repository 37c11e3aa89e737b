"""The budget service: tenants, teams, projects, API keys (and the edge's key
check), budgets, and reserve-then-settle admission over Redis and the
PostgreSQL ledger."""
