"""Baseline: the schema of scanflow at commit 15096dd (the last release without Alembic).

A database made before Alembic is brought to this revision in place: the tables it lacks are
created, the ones it has are kept with their rows (`scanflow.store.migrate` first adds the message
columns `error`/`retry_at` that releases before 15096dd added by hand). Frozen: a schema change
is a new revision after this one.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create every table of the baseline that is missing: on a database made before Alembic
    (by a release that created its tables with `create_all`) only the ones it lacks."""
    have = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in _TABLES.items():
        if name not in have:
            create()


def _actions() -> None:
    op.create_table('actions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('agent', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )


def _agent_state() -> None:
    op.create_table('agent_state',
    sa.Column('agent', sa.String(length=200), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('value', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('agent', 'key')
    )


def _agents() -> None:
    op.create_table('agents',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('app', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=50), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('heartbeat', sa.Float(), nullable=True),
    sa.Column('api_host', sa.String(length=100), nullable=True),
    sa.Column('api_port', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )


def _decisions() -> None:
    op.create_table('decisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=300), nullable=True),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('agent', sa.String(length=200), nullable=False),
    sa.Column('sensor', sa.String(length=200), nullable=False),
    sa.Column('rule', sa.String(length=200), nullable=False),
    sa.Column('fired', sa.Boolean(), nullable=False),
    sa.Column('service', sa.String(length=200), nullable=True),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('actions', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_index(op.f('ix_decisions_agent'), 'decisions', ['agent'], unique=False)
    op.create_index(op.f('ix_decisions_ts'), 'decisions', ['ts'], unique=False)


def _deployments() -> None:
    op.create_table('deployments',
    sa.Column('service', sa.String(length=200), nullable=False),
    sa.Column('app', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('alias', sa.String(length=100), nullable=False),
    sa.Column('model_version', sa.String(length=50), nullable=True),
    sa.Column('host', sa.String(length=100), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('workdir', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('previous_version', sa.String(length=50), nullable=True),
    sa.Column('canary_version', sa.String(length=50), nullable=True),
    sa.Column('canary_share', sa.Float(), nullable=False),
    sa.Column('shadow_version', sa.String(length=50), nullable=True),
    sa.PrimaryKeyConstraint('service')
    )


def _events() -> None:
    op.create_table('events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('source', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=100), nullable=False),
    sa.Column('service', sa.String(length=200), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_events_kind'), 'events', ['kind'], unique=False)
    op.create_index(op.f('ix_events_service'), 'events', ['service'], unique=False)
    op.create_index(op.f('ix_events_ts'), 'events', ['ts'], unique=False)


def _labels() -> None:
    op.create_table('labels',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('label', sa.JSON(), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('request_id')
    )


def _leases() -> None:
    op.create_table('leases',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('acquired_at', sa.Float(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('purpose', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def _messages() -> None:
    op.create_table('messages',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('sender', sa.String(length=200), nullable=False),
    sa.Column('recipient', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=100), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('handled_at', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('retry_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_index('ix_messages_inbox', 'messages', ['recipient', 'status', 'id'], unique=False)


def _predictions() -> None:
    op.create_table('predictions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('service', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=50), nullable=True),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=True),
    sa.Column('inputs_f32', sa.LargeBinary(), nullable=True),
    sa.Column('outputs', sa.JSON(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    op.create_index('ix_predictions_service_ts', 'predictions', ['service', 'ts'], unique=False)
    op.create_index('ix_predictions_service_version_ts', 'predictions',
                    ['service', 'model_version', 'ts'], unique=False)


def _shadow_predictions() -> None:
    op.create_table('shadow_predictions',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('service', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=50), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('outputs', sa.JSON(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('request_id')
    )
    op.create_index(op.f('ix_shadow_predictions_service'), 'shadow_predictions', ['service'], unique=False)


def _workflow_runs() -> None:
    op.create_table('workflow_runs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('app', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('workflow', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('trigger', sa.JSON(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('spec_path', sa.Text(), nullable=True),
    sa.Column('use_cache', sa.Boolean(), nullable=False),
    sa.Column('owner_pid', sa.Integer(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_workflow_runs_created_at'), 'workflow_runs', ['created_at'], unique=False)
    op.create_index(op.f('ix_workflow_runs_status'), 'workflow_runs', ['status'], unique=False)
    op.create_index(op.f('ix_workflow_runs_workflow'), 'workflow_runs', ['workflow'], unique=False)


def _step_runs() -> None:
    op.create_table('step_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('log_path', sa.Text(), nullable=True),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('outputs', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('cache_key', sa.String(length=64), nullable=True),
    sa.Column('cached_from', sa.String(length=300), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['workflow_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'step')
    )
    op.create_index(op.f('ix_step_runs_cache_key'), 'step_runs', ['cache_key'], unique=False)
    op.create_index(op.f('ix_step_runs_run_id'), 'step_runs', ['run_id'], unique=False)


_TABLES = {
    'actions': _actions,
    'agent_state': _agent_state,
    'agents': _agents,
    'decisions': _decisions,
    'deployments': _deployments,
    'events': _events,
    'labels': _labels,
    'leases': _leases,
    'messages': _messages,
    'predictions': _predictions,
    'shadow_predictions': _shadow_predictions,
    'workflow_runs': _workflow_runs,
    'step_runs': _step_runs,
}


def downgrade() -> None:
    op.drop_index(op.f('ix_step_runs_run_id'), table_name='step_runs')
    op.drop_index(op.f('ix_step_runs_cache_key'), table_name='step_runs')
    op.drop_table('step_runs')
    op.drop_index(op.f('ix_workflow_runs_workflow'), table_name='workflow_runs')
    op.drop_index(op.f('ix_workflow_runs_status'), table_name='workflow_runs')
    op.drop_index(op.f('ix_workflow_runs_created_at'), table_name='workflow_runs')
    op.drop_table('workflow_runs')
    op.drop_index(op.f('ix_shadow_predictions_service'), table_name='shadow_predictions')
    op.drop_table('shadow_predictions')
    op.drop_index('ix_predictions_service_version_ts', table_name='predictions')
    op.drop_index('ix_predictions_service_ts', table_name='predictions')
    op.drop_table('predictions')
    op.drop_index('ix_messages_inbox', table_name='messages')
    op.drop_table('messages')
    op.drop_table('leases')
    op.drop_table('labels')
    op.drop_index(op.f('ix_events_ts'), table_name='events')
    op.drop_index(op.f('ix_events_service'), table_name='events')
    op.drop_index(op.f('ix_events_kind'), table_name='events')
    op.drop_table('events')
    op.drop_table('deployments')
    op.drop_index(op.f('ix_decisions_ts'), table_name='decisions')
    op.drop_index(op.f('ix_decisions_agent'), table_name='decisions')
    op.drop_table('decisions')
    op.drop_table('agents')
    op.drop_table('agent_state')
    op.drop_table('actions')
