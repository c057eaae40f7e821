#!/usr/bin/env python3
"""Drives PyPI py-eureka-client against Waymark's Eureka API, one step per command.

Started with the server URL and the instance to register, it reads commands on stdin, one
per line, and answers each with one line on stdout, "@@ " and JSON: {"ok": true, ...} or
{"ok": false, "error": "..."} (the library logs to stdout as well). The test (tests/tests/eureka.rs) decides the order and
checks DNS between steps. Only the library's public API is used: the EurekaClient (which
registers, heartbeats in its own thread and keeps its registry up to date from deltas), and
the library's fetch functions (full registry and delta, parsed from Waymark's XML: this
library sends no Accept header).

Commands:
  start                      register, start heartbeats and registry fetches
  override STATUS            client.status_update(STATUS): PUT .../status?value=STATUS
  delete_override            client.delete_status_override(): DELETE .../status
  full APP                   eureka_basic.get_applications: the instances of APP in it
  delta APP                  eureka_basic.get_delta: APP's instances in it, and the hash code
  cache APP                  the instances of APP in the client's own registry copy
  stop                       client.stop(): status DOWN, then cancel (DELETE)
  exit                       exit at once, without cancelling (a missed heartbeat follows)
"""

import argparse
import asyncio
import json
import os
import sys
import traceback

from py_eureka_client import eureka_basic
from py_eureka_client.eureka_client import EurekaClient


def reply(**fields):
    # The library logs to stdout too: protocol lines are marked.
    sys.stdout.write("@@ " + json.dumps(fields) + "\n")
    sys.stdout.flush()


def instances_of(applications, app):
    if applications is None:
        return []
    found = applications.get_application(app)
    return [
        {
            "id": i.instanceId,
            "status": i.status,
            "action": i.actionType,
            "ip": i.ipAddr,
            "port": i.port.port if i.port else None,
            "app": i.app,
            "metadata": i.metadata,
        }
        for i in found.instances
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True, help="http://127.0.0.1:PORT/eureka/")
    p.add_argument("--app", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--renew", type=int, default=1)
    p.add_argument("--lease", type=int, default=2)
    args = p.parse_args()

    loop = asyncio.new_event_loop()
    client = EurekaClient(
        eureka_server=args.server,
        app_name=args.app,
        instance_id=args.id,
        instance_host=args.host,
        instance_ip=args.ip,
        instance_port=args.port,
        renewal_interval_in_secs=args.renew,
        duration_in_secs=args.lease,
        metadata={"team": "blue"},
    )
    reply(ok=True, ready=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        try:
            if cmd == "start":
                loop.run_until_complete(client.start())
                reply(ok=True)
            elif cmd == "override":
                loop.run_until_complete(client.status_update(rest[0]))
                reply(ok=True)
            elif cmd == "delete_override":
                loop.run_until_complete(client.delete_status_override())
                reply(ok=True)
            elif cmd == "full":
                apps = loop.run_until_complete(eureka_basic.get_applications(args.server))
                reply(ok=True, instances=instances_of(apps, rest[0]),
                      hashcode=apps.appsHashcode, version=apps.versionsDelta)
            elif cmd == "delta":
                apps = loop.run_until_complete(eureka_basic.get_delta(args.server))
                reply(ok=True, instances=instances_of(apps, rest[0]),
                      hashcode=apps.appsHashcode, version=apps.versionsDelta)
            elif cmd == "cache":
                reply(ok=True, instances=instances_of(client.applications, rest[0]))
            elif cmd == "stop":
                loop.run_until_complete(client.stop())
                reply(ok=True)
            elif cmd == "exit":
                reply(ok=True)
                # No cancel, no clean-up: the heartbeat thread simply stops.
                os._exit(0)
            else:
                reply(ok=False, error=f"unknown command {cmd!r}")
        except Exception as e:  # reported to the test, which fails with it
            reply(ok=False, error=f"{cmd}: {e!r}", trace=traceback.format_exc())


if __name__ == "__main__":
    main()
