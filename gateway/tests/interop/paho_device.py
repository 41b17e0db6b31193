#!/usr/bin/env python3
"""A device written with Eclipse Paho's Python client (paho-mqtt 2.x), for
gateway/tests/interop.rs: a client nobody in this project wrote, in MQTT
3.1.1 or 5.

    paho_device.py HOST PORT DEVICE SECRET VERSION MODE

VERSION is 3.1.1 or 5. MODE:
- device: subscribe to the device's commands and desired state; answer
  every command (accepted, then result "succeeded", QoS 1) and report what
  the desired document asks for, until COMMANDS commands (environment,
  default 2) were answered and a non-empty desired document was reported;
  then disconnect.
- badpass: log in (the caller gives a wrong secret) and say what the
  CONNACK answered.
- acl: log in and publish to another device's topic; say how the gateway
  ended the connection.

Each step is one JSON line on stdout; the caller waits for them (every wait
here is bounded too). Exit status 0 when the mode ran to its end.
"""

import json
import os
import queue
import sys

import paho.mqtt.client as mqtt

WAIT = 20.0


def say(**fields):
    print(json.dumps(fields), flush=True)


def main():
    host, port, device, secret, version, mode = sys.argv[1:7]
    protocol = mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5
    events = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=protocol
    )
    client.username_pw_set(device, secret)
    client.on_connect = lambda c, u, flags, rc, props: events.put(
        ("connack", rc.value, rc.is_failure)
    )
    client.on_subscribe = lambda c, u, mid, rcs, props: events.put(
        ("suback", [r.value for r in rcs])
    )
    client.on_message = lambda c, u, msg: events.put(
        ("message", msg.topic, msg.payload.decode())
    )
    client.on_disconnect = lambda c, u, flags, rc, props: events.put(
        ("disconnect", rc.value)
    )

    def next_event(kinds):
        while True:
            try:
                event = events.get(timeout=WAIT)
            except queue.Empty:
                say(error="timed out waiting for " + "/".join(kinds))
                os._exit(2)
            if event[0] in kinds:
                return event

    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    _, code, failed = next_event(["connack", "disconnect"])
    say(connack=code, failed=failed)
    if mode == "badpass":
        os._exit(0 if failed else 1)
    if failed:
        os._exit(1)

    if mode == "acl":
        client.publish("devices/someone-else/shadow/reported", "{}", qos=1)
        _, code = next_event(["disconnect"])
        say(disconnect=code)
        os._exit(0)

    commands = f"devices/{device}/commands"
    desired = f"devices/{device}/shadow/desired"
    client.subscribe([(commands, 1), (desired, 1)])
    _, codes = next_event(["suback"])
    say(suback=codes)
    want = int(os.environ.get("COMMANDS", "2"))
    answered = set()
    reported = False
    while len(answered) < want or not reported:
        event = next_event(["message", "disconnect"])
        if event[0] == "disconnect":
            say(error="disconnected", code=event[1])
            os._exit(1)
        _, topic, payload = event
        doc = json.loads(payload)
        if topic == commands:
            cid = doc["id"]
            if cid in answered:
                continue  # delivered again: already answered
            base = f"{commands}/{cid}"
            client.publish(base + "/accepted", "{}", qos=1).wait_for_publish(WAIT)
            result = json.dumps({"status": "succeeded", "output": {"by": "paho"}})
            client.publish(base + "/result", result, qos=1).wait_for_publish(WAIT)
            answered.add(cid)
            say(command=cid, name=doc["name"])
        elif topic == desired and doc["state"]:
            state = dict(doc["state"])
            client.publish(
                f"devices/{device}/shadow/reported", json.dumps(state), qos=1
            ).wait_for_publish(WAIT)
            reported = True
            say(desired=doc["state"], version=doc["version"])
    client.disconnect()
    client.loop_stop()
    say(done=True)


if __name__ == "__main__":
    main()
