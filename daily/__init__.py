"""The scheduled model update (``csmf daily``): new events → warm start → quality gate → verified
bundle → every replica reloads. Orchestrates trainer/ and index_builder/ and talks to the service
only over its admin API (docs/operations.md#the-daily-update)."""
