"""The monitoring agent (`edge-agent run`): capture, the per-window hot loop, the control plane, MQTT out."""
