"""SQL persistence (SQLAlchemy 2 async): one schema for SQLite and PostgreSQL."""
