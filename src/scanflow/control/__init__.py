"""The control layer: the one path for every action on a service or workflow.

Below the agents, above engine and serving. It uses spec, store, tracking and the `Engine` /
`Deployer` interfaces, never a concrete backend (only `scanflow.control.backends` builds those):
durable event sources and triggers, service leases, and the model operations (promote, rollout,
rollback, scale, canary, shadow) that always take the lease and always record what they did.
"""
