"""Files end to end on both backends, through the real HTTP path: upload with a signed URL,
complete, attach, deliver, download by participants only; refusals write nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import delete_op, op
from tests.support.raw_stream import RawStream
from tests.support.rpc import details, status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import upload_service_pb2 as up
from threadline.v1 import upload_service_pb2_grpc as upg
from threadline_server.app import ThreadlineServer

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@dataclass
class Running:
    app: ThreadlineServer
    channel: grpc.aio.Channel
    http: httpx.AsyncClient
    backend: str

    def meta(self, user: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.app.mint(user, 600))


@pytest.fixture(params=["local", "gcs"])
async def files(request, settings_factory) -> AsyncIterator[Running]:
    storage: dict[str, object] = {"url_expiry_s": 60, "orphan_ttl_s": 120}
    if request.param == "gcs":
        emulator = request.getfixturevalue("emulator")
        storage |= {
            "backend": "gcs",
            "bucket": emulator.new_bucket(),
            "gcs_endpoint": emulator.endpoint,
            "gcs_credentials_file": str(emulator.key_file),
            "gcs_anonymous": True,
        }
    app = ThreadlineServer(settings_factory(storage=storage))
    endpoints = await app.start()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel,
        httpx.AsyncClient(timeout=30) as http,
    ):
        yield Running(app, channel, http, request.param)
    await app.stop(grace=0.5)


async def upload(run: Running, user: str, data: bytes, name: str = "cat.png") -> str:
    return await upload_as(run.channel, run.http, run.meta(user), data, name)


async def upload_as(
    channel: grpc.aio.Channel,
    http: httpx.AsyncClient,
    meta: tuple[tuple[str, str], ...],
    data: bytes,
    name: str = "cat.png",
) -> str:
    """Create, PUT to the signed URL with a plain HTTP client, complete; returns the id."""
    stub = upg.UploadServiceStub(channel)
    created = await stub.CreateUpload(
        up.CreateUploadRequest(file_name=name, content_type="image/png", size_bytes=len(data)),
        metadata=meta,
    )
    assert created.upload.state == 1  # pending
    put = await http.request(
        created.upload_method,
        created.upload_url,
        content=data,
        headers=dict(created.upload_headers),
    )
    assert put.status_code in (200, 201), put.text
    done = await stub.CompleteUpload(
        up.CompleteUploadRequest(upload_id=created.upload.id), metadata=meta
    )
    assert done.upload.state == 2 and done.upload.sha256 == hashlib.sha256(data).hexdigest()
    return created.upload.id


async def test_attach_deliver_download_and_deny_outsiders(files):
    run = files
    thread = await create_thread(run.channel, run.app.mint("alice", 600), "bob")
    upload_id = await upload(run, "alice", PNG)
    alice = RawStream(run.channel, run.app.mint("alice", 600))
    bob = RawStream(run.channel, run.app.mint("bob", 600))
    await alice.hello()
    await bob.hello()
    rid = alice.send(
        rt.ClientFrame(
            send_message=rt.SendMessage(
                client_op_id="with-file", thread_id=thread, text="", attachment_ids=[upload_id]
            )
        )
    )
    result = (await alice.reply_to(rid)).operation_result
    assert result.WhichOneof("outcome") == "confirmed", result
    [event] = await bob.events(1)
    [attachment] = event.message.attachments
    assert (attachment.upload_id, attachment.file_name, attachment.size_bytes) == (
        upload_id,
        "cat.png",
        len(PNG),
    )
    assert attachment.sha256 == hashlib.sha256(PNG).hexdigest()

    stub = upg.UploadServiceStub(run.channel)
    url = await stub.GetDownloadUrl(
        up.GetDownloadUrlRequest(upload_id=upload_id), metadata=run.meta("bob")
    )
    got = await run.http.get(url.download_url)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == attachment.sha256
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDownloadUrl(
            up.GetDownloadUrlRequest(upload_id=upload_id), metadata=run.meta("carol")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # The same upload cannot be attached twice; someone else's or a pending one not at all.
    again = await alice.send_message(thread, "again", "reuse")
    assert again.WhichOneof("outcome") == "confirmed"
    reuse_rid = alice.send(
        rt.ClientFrame(
            send_message=rt.SendMessage(
                client_op_id="reuse-2", thread_id=thread, text="x", attachment_ids=[upload_id]
            )
        )
    )
    reused = (await alice.reply_to(reuse_rid)).operation_result
    assert reused.rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status_details(reused.rejected)["reason"] == "UPLOAD_NOT_USABLE"
    mine = await upload(run, "alice", b"alice's bytes" * 10, "a.png")
    steal_rid = bob.send(
        rt.ClientFrame(
            send_message=rt.SendMessage(
                client_op_id="steal", thread_id=thread, text="x", attachment_ids=[mine]
            )
        )
    )
    stolen = (await bob.reply_to(steal_rid)).operation_result
    assert stolen.rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    pending = await stub.CreateUpload(
        up.CreateUploadRequest(file_name="p.png", content_type="image/png", size_bytes=10),
        metadata=run.meta("alice"),
    )
    early_rid = alice.send(
        rt.ClientFrame(
            send_message=rt.SendMessage(
                client_op_id="early", thread_id=thread, text="x", attachment_ids=[pending.upload.id]
            )
        )
    )
    early = (await alice.reply_to(early_rid)).operation_result
    assert early.rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]

    # Deleting the message removes its file.
    deleted = await op(alice, delete_op("drop", result.confirmed.message))
    assert deleted.confirmed.message.deleted
    await run.app.uploads.purge()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDownloadUrl(
            up.GetDownloadUrlRequest(upload_id=upload_id), metadata=run.meta("alice")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    gone = await run.http.get(url.download_url)
    assert gone.status_code == 404
    alice.cancel()
    bob.cancel()


@pytest.mark.parametrize(
    ("name", "content_type", "size", "field"),
    [
        ("cat.png", "image/png", 25_000_001, "size_bytes"),
        ("cat.exe", "application/x-msdownload", 10, "content_type"),
        ("../../etc/passwd", "text/plain", 10, "file_name"),
        ("a/b.png", "image/png", 10, "file_name"),
        ("ok.png", "image/png", 0, "size_bytes"),
    ],
)
async def test_create_upload_refuses_bad_declarations(files, name, content_type, size, field):
    stub = upg.UploadServiceStub(files.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateUpload(
            up.CreateUploadRequest(file_name=name, content_type=content_type, size_bytes=size),
            metadata=files.meta("alice"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details(err.value)["fields"]


async def test_bytes_that_do_not_match_the_declaration_are_refused(files):
    stub = upg.UploadServiceStub(files.channel)
    created = await stub.CreateUpload(
        up.CreateUploadRequest(file_name="s.png", content_type="image/png", size_bytes=100),
        metadata=files.meta("alice"),
    )
    headers = dict(created.upload_headers)
    put = await files.http.request("PUT", created.upload_url, content=b"x" * 150, headers=headers)
    if files.backend == "local":  # the local listener refuses the excess while it streams
        assert put.status_code == 413
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CompleteUpload(
            up.CompleteUploadRequest(upload_id=created.upload.id), metadata=files.meta("alice")
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err.value)["reason"] == "UPLOAD_MISMATCH"


async def test_local_urls_refuse_tampering_expiry_and_other_objects(settings_factory):
    app = ThreadlineServer(settings_factory(storage={"url_expiry_s": 1, "orphan_ttl_s": 60}))
    endpoints = await app.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel,
            httpx.AsyncClient(timeout=30) as http,
        ):
            stub = upg.UploadServiceStub(channel)
            meta = bearer(app.mint("alice", 600))
            a, b = [
                await stub.CreateUpload(
                    up.CreateUploadRequest(file_name=n, content_type="text/plain", size_bytes=3),
                    metadata=meta,
                )
                for n in ("a.txt", "b.txt")
            ]
            headers = dict(a.upload_headers)
            tampered = a.upload_url.replace("sig=", "sig=0")
            assert (await http.put(tampered, content=b"abc", headers=headers)).status_code == 403
            other = b.upload_url.split("?")[0] + "?" + a.upload_url.split("?")[1]
            assert (await http.put(other, content=b"abc", headers=headers)).status_code == 403
            as_get = await http.get(a.upload_url)  # signed for PUT, used for GET
            assert as_get.status_code == 403
            await asyncio.sleep(1.5)
            expired = await http.put(a.upload_url, content=b"abc", headers=headers)
            assert expired.status_code == 403
    finally:
        await app.stop(grace=0.5)


async def test_cleanup_cli_removes_orphans_keeps_attached_and_dry_run_changes_nothing(
    tmp_path, db_url
):
    from tests.support.process import ServerProcess

    proc = ServerProcess(
        tmp_path / "data",
        db_url,
        THREADLINE_STORAGE__URL_EXPIRY_S="1",
        THREADLINE_STORAGE__ORPHAN_TTL_S="2",
    )
    proc.start()
    try:
        tok = proc.cli("token", "alice")
        async with (
            grpc.aio.insecure_channel(proc.target) as channel,
            httpx.AsyncClient(timeout=30) as http,
        ):
            stub = upg.UploadServiceStub(channel)
            kept = await upload_as(channel, http, bearer(tok), PNG)
            thread = await create_thread(channel, tok, "bob")
            stream = RawStream(channel, tok)
            await stream.hello()
            rid = stream.send(
                rt.ClientFrame(
                    send_message=rt.SendMessage(
                        client_op_id="keep", thread_id=thread, text="", attachment_ids=[kept]
                    )
                )
            )
            assert (await stream.reply_to(rid)).operation_result.WhichOneof(
                "outcome"
            ) == "confirmed"
            stream.cancel()
            orphan = await stub.CreateUpload(
                up.CreateUploadRequest(file_name="o.png", content_type="image/png", size_bytes=5),
                metadata=bearer(tok),
            )
            await asyncio.sleep(2.5)
            dry = proc.cli("cleanup", "--dry-run")
            assert f"would remove upload {orphan.upload.id}" in dry and kept not in dry
            assert "would remove 1 uploads" in dry
            again = proc.cli("cleanup", "--dry-run")  # a dry run changed nothing
            assert f"would remove upload {orphan.upload.id}" in again
            real = proc.cli("cleanup")
            assert f"removed upload {orphan.upload.id}" in real
            assert "removed 0 uploads" in proc.cli("cleanup")
            url = await stub.GetDownloadUrl(
                up.GetDownloadUrlRequest(upload_id=kept), metadata=bearer(tok)
            )
            assert (await http.get(url.download_url)).content == PNG  # attached file kept
    finally:
        proc.stop()
