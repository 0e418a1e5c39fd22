"""Alembic environment of cmr-ai's database (run by :func:`plugin.db.migrate`, or ``alembic``
with ``-x url=…``). The connection comes from the caller; SQLite ALTERs run in batch mode."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from plugin.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # the alembic CLI: alembic -c … -x url=sqlite:///var/cmr-ai.db upgrade head
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
        with create_engine(url).connect() as conn:
            _run(conn)
            conn.commit()
        return
    _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("cmr-ai migrations run online only (plugin.db.migrate or `cmr-ai db upgrade`)")
run_migrations_online()
