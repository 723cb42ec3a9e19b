"""A cluster node killed mid-traffic (SIGKILL, real `threadline serve` processes sharing the
database and Redis): its client reconnects to another node, resumes and resends what was not
acknowledged with the same op ids; a participant on the surviving node ends up with every
message exactly once, in order, and every acknowledged message is stored."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc

from tests.conftest import bearer
from tests.e2e.test_sync_resume import resume
from tests.support.cluster import SHARED_REDIS
from tests.support.process import ServerProcess
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg

TOTAL = 120


async def test_sigkill_of_a_node_loses_and_duplicates_nothing(tmp_path, db_url):
    cluster = {
        "THREADLINE_CLUSTER__REDIS_URL": SHARED_REDIS,
        "THREADLINE_CLUSTER__KEY_PREFIX": f"test-{uuid.uuid4().hex}",
    }
    # The embedded issuer (dev sign-in) names its own node's HTTP address, so each node is given
    # tokens it minted. A cluster behind one address verifies one issuer's tokens (Clerk, or a
    # shared auth.issuer and auth.jwks_url).
    survivor = ServerProcess(tmp_path / "data", db_url, **cluster)
    doomed = ServerProcess(tmp_path / "data", db_url, **cluster)
    survivor.start()
    doomed.start()
    try:
        alice_token, bob_token = survivor.cli("token", "alice"), survivor.cli("token", "bob")
        async with (
            grpc.aio.insecure_channel(survivor.target) as near,
            grpc.aio.insecure_channel(doomed.target) as far,
        ):
            thread = (
                await tsg.ThreadServiceStub(near).CreateThread(
                    ts.CreateThreadRequest(
                        thread=thread_pb2.Thread(title="crash", participant_ids=["bob"])
                    ),
                    metadata=bearer(alice_token),
                )
            ).thread.id
            bob = RawStream(near, bob_token)
            await bob.hello()
            alice = RawStream(far, doomed.cli("token", "alice"))
            welcome = await alice.hello()
            acked: set[str] = set()

            async def send(stream: RawStream, n: int) -> None:
                result = await stream.send_message(thread, f"m{n}", f"op-{n}", timeout=10)
                if result.WhichOneof("outcome") == "confirmed":
                    acked.add(f"op-{n}")

            tasks = [asyncio.create_task(send(alice, n)) for n in range(TOTAL)]
            while len(acked) < TOTAL // 4:
                await asyncio.sleep(0.005)
            doomed.kill()  # mid-traffic: some sends acked, some committed unacked, some lost
            for task in tasks:
                with contextlib.suppress(Exception):
                    await task
            alice.cancel()
            assert TOTAL // 4 <= len(acked) < TOTAL

            # Alice comes back on the surviving node and resends everything not acknowledged.
            again = RawStream(near, alice_token)
            await resume(again, rt.SyncState(epoch=welcome.epoch, change_seq=0))
            await asyncio.gather(*(send(again, n) for n in range(TOTAL) if f"op-{n}" not in acked))
            assert len(acked) == TOTAL

            got = await bob.events(TOTAL, timeout=30)
            assert [e.thread_seq for e in got] == list(range(1, TOTAL + 1))  # once, in order
            assert sorted(e.message.text for e in got) == sorted(f"m{n}" for n in range(TOTAL))
            await bob.no_event(0.5)
            for stream in (bob, again):
                stream.cancel()
    finally:
        doomed.stop()
        survivor.stop()
