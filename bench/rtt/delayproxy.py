# A delay proxy for the latency-theorem benchmark (bench/rtt/run.sh).
# Usage: delayproxy.py DELAY_MS LISTEN_PORT:TARGET_PORT ...
# Forwards each listen port to its target on 127.0.0.1, delaying every byte
# by DELAY_MS in both directions (order kept).
import asyncio, sys, time
D = float(sys.argv[1]) / 1000.0

async def pump(reader, writer):
    q = asyncio.Queue()
    async def rd():
        try:
            while True:
                data = await reader.read(65536)
                q.put_nowait((time.monotonic() + D, data))
                if not data:
                    return
        except Exception:
            q.put_nowait((time.monotonic(), b""))
    async def wr():
        try:
            while True:
                due, data = await q.get()
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if not data:
                    writer.close(); return
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
    await asyncio.gather(rd(), wr())

def handler(target):
    async def h(r, w):
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", target)
        except Exception:
            w.close(); return
        await asyncio.gather(pump(r, tw), pump(tr, w))
    return h

async def main():
    servers = []
    for spec in sys.argv[2:]:
        lp, tp = map(int, spec.split(":"))
        servers.append(await asyncio.start_server(handler(tp), "127.0.0.1", lp))
    print("READY", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))
asyncio.run(main())
