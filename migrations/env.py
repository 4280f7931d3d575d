"""Alembic environment: migrations run on the connection the store hands over (see cde_workbench.store.upgrade)."""
from alembic import context

connection = context.config.attributes.get('connection')
if connection is None:
    raise RuntimeError('run migrations through cde_workbench.store.upgrade(), which passes a connection')
context.configure(connection=connection, render_as_batch=connection.dialect.name == 'sqlite')
with context.begin_transaction():
    context.run_migrations()
