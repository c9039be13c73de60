"""A cleanup agent process of the demo. Nothing is deleted: commands are only recorded.

Started by the orchestrator with the handoff's ``TRACEPARENT``/``BAGGAGE`` in its
environment, so its spans join the session with the full delegation chain.
"""

from __future__ import annotations

import json
import os
import sys
import time

from agentgov.instrumentation import Governance, configure, inject_env


def main() -> None:
    plan = json.loads(sys.argv[1])  # {"agents": [{"name":..., "commands": [[tool, cmd, [res]]]}]}
    provider = configure(service_name=f"cleanup-worker-{os.getpid()}")
    gov = Governance(provider)
    try:
        # The first agent is the handoff's target; the others are its siblings, handed
        # off by the orchestrator too (their carriers arrive as JSON in the plan).
        for spec in plan["agents"]:
            carrier = spec.get("carrier") or dict(os.environ)
            with gov.agent(spec["name"], carrier=carrier) as agent:
                for tool, command, resources in spec["commands"]:
                    with agent.tool(tool, command=command, resources=resources):
                        time.sleep(0.005)  # simulated: the command is not executed
                agent.usage(input_tokens=420, output_tokens=80, usd=0.0031)
                agent.message(to=agent.parent_id, content=f"{spec['name']} done")
    finally:
        provider.shutdown()
    _ = inject_env  # re-exported for agents that spawn their own children


if __name__ == "__main__":
    main()
