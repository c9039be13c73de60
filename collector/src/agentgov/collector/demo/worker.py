"""A cleanup agent process of the demo. Nothing is deleted: commands are only recorded.

Started by the orchestrator with the handoff's ``TRACEPARENT``/``BAGGAGE`` in its
environment (and the governor's URL and an agent key), so its spans join the session with
the full delegation chain and every step is decided by the governor.
"""

from __future__ import annotations

import json
import os
import sys
import time

from agentgov.instrumentation import Governance, GovernorClient, SessionKilled, configure


def main() -> None:
    plan = json.loads(sys.argv[1])  # {"agents": [{"name", "commands", "carrier"?, "linger"?}]}
    provider = configure(service_name=f"cleanup-worker-{os.getpid()}")
    gov = Governance(provider, governor=GovernorClient())
    try:
        for spec in plan["agents"]:
            carrier = spec.get("carrier") or dict(os.environ)
            try:
                with gov.agent(spec["name"], carrier=carrier) as agent:
                    for tool, command, resources in spec["commands"]:
                        with agent.tool(tool, command=command, resources=resources):
                            time.sleep(0.005)  # simulated: the command is not executed
                    agent.usage(input_tokens=420, output_tokens=80, usd=0.0031)
                    agent.message(to=agent.parent_id, content=f"{spec['name']} done")
                    if spec.get("linger"):
                        # keeps watching the deployment, one governed step at a time
                        print(json.dumps({"lingering": agent.agent_id}), flush=True)
                        deadline = time.monotonic() + 30
                        while time.monotonic() < deadline:
                            agent.checkpoint()
                            time.sleep(0.005)
            except SessionKilled as stop:
                print(
                    json.dumps(
                        {
                            "stopped": spec["name"],
                            "at_ns": time.monotonic_ns(),
                            "reason": stop.reason,
                        }
                    ),
                    flush=True,
                )
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
