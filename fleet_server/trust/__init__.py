"""The key ceremony's server side: changing what the fleet trusts, and carrying the change to
every device (routes and the fleet-wide re-issue). Key storage and signing are
:mod:`fleet_server.keys`."""
