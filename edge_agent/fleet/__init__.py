"""The operator's side of the fleet protocol (docs/fleet.md): `edge-agent fleet status | push | alerts | cmd |
keygen`, an MQTT client of the same broker as the agents. It may use edge_agent.agent (topics, validators,
signing); the agent never imports it."""
