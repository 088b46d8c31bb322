"""A thin, typed client of the store daemon's gRPC service."""

import os
import uuid as uuidlib
from dataclasses import dataclass
from typing import Dict, List, Sequence

import grpc

from ._proto import DEVICE_TYPE_CPU, DEVICE_TYPE_GPU, HOST_STATES, StorageStub, messages
from .errors import SllmStoreError

DEFAULT_ADDR = "127.0.0.1:8073"
_MAX_MESSAGE = 256 << 20


def resolve_server(server: "str | None" = None) -> str:
    """The daemon's address: argument, else $SLLM_STORE_ADDR, else 127.0.0.1:8073."""
    return server or os.environ.get("SLLM_STORE_ADDR") or DEFAULT_ADDR


def resolve_storage_path(storage_path: "str | None" = None) -> str:
    """The storage path: argument, else $STORAGE_PATH, else ~/models."""
    return os.path.expanduser(storage_path or os.environ.get("STORAGE_PATH") or "~/models")


def store_token() -> "str | None":
    """The token the daemon may require (`sllm-store start --auth-token-file`):
    $SLLM_STORE_TOKEN, else the first line of the file $SLLM_STORE_TOKEN_FILE
    names; None when neither is set."""
    token = os.environ.get("SLLM_STORE_TOKEN")
    if not token and os.environ.get("SLLM_STORE_TOKEN_FILE"):
        path = os.environ["SLLM_STORE_TOKEN_FILE"]
        try:
            with open(path, encoding="ascii") as f:
                token = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            raise SllmStoreError(f"cannot read the store token from {path} ($SLLM_STORE_TOKEN_FILE): {e}") from None
    token = (token or "").strip()
    return token or None


def storage_path_for(storage_path: "str | None" = None, server: "str | None" = None) -> str:
    """The storage path of a client of the daemon at `server`: argument,
    else $STORAGE_PATH, else the daemon's own (GetServerConfig) when that
    folder is on this host, else ~/models."""
    if storage_path or os.environ.get("STORAGE_PATH"):
        return resolve_storage_path(storage_path)
    try:
        with StoreClient(server, timeout_s=5.0) as client:
            said = client.server_config().storage_path
    except Exception:  # noqa: BLE001 (unreachable: the load itself will say so)
        said = ""
    if said and os.path.isabs(said) and os.path.isdir(said):
        return said
    return resolve_storage_path(None)


@dataclass
class ServerConfig:
    mem_pool_size: int
    chunk_size: int
    device_backend: str
    device_uuids: List[str]
    io_engine: str
    host_shm_dir: str
    version: str
    storage_path: str = ""


@dataclass
class CopyChunk:
    """Copy `size` bytes from model offset `src_offset` to `dst_offset` in buffer `handle_idx`."""

    src_offset: int
    size: int
    dst_offset: int
    handle_idx: int = 0


class StoreClient:
    """Connection to the daemon. `server` is host:port or unix:<path>."""

    def __init__(self, server: "str | None" = None, timeout_s: float = 30.0):
        self.server = resolve_server(server)
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
        self._channel = grpc.insecure_channel(self.server, options=options)
        self._stub = StorageStub(self._channel)
        token = store_token()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, name: str, request, timeout: "float | None" = None, doing: "str | None" = None):
        """Calls RPC `name`; a failure says what the call was `doing` (in
        words; the RPC's name when not given) and the status code in words."""
        try:
            return getattr(self._stub, name)(request, timeout=timeout or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise SllmStoreError(
                    f"cannot reach the store daemon at {self.server}: {e.details()}; "
                    "start it with `sllm-store start`, or set SLLM_STORE_ADDR"
                ) from None
            words = code.name.lower().replace("_", " ")
            raise SllmStoreError(f"{doing or name} failed: {e.details()} ({words})") from None

    def server_config(self) -> ServerConfig:
        r = self._call(
            "GetServerConfig", messages["GetServerConfigRequest"](), doing="asking the daemon for its settings"
        )
        return ServerConfig(
            mem_pool_size=r.mem_pool_size,
            chunk_size=r.chunk_size,
            device_backend=r.device_backend or "cuda",
            device_uuids=list(r.device_uuids),
            io_engine=r.io_engine,
            host_shm_dir=r.host_shm_dir,
            version=r.version,
            storage_path=r.storage_path,
        )

    def register(self, model_path: str) -> int:
        request = messages["RegisterModelRequest"](model_path=model_path)
        return self._call("RegisterModel", request, doing="registering the model").model_size

    def load_to_host(self, model_path: str) -> None:
        self._call(
            "LoadModelAsync",
            messages["LoadModelRequest"](model_path=model_path, target_device_type=DEVICE_TYPE_CPU),
            doing="loading the model into the daemon's pool",
        )

    def load_to_devices(
        self,
        model_path: str,
        replica_uuid: str,
        copies: Dict[str, Sequence[CopyChunk]],
        handles: Dict[str, Sequence[bytes]],
    ) -> None:
        request = messages["LoadModelRequest"](
            model_path=model_path, replica_uuid=replica_uuid, target_device_type=DEVICE_TYPE_GPU
        )
        for uuid, chunks in copies.items():
            request.chunks[uuid].chunks.extend(
                messages["MemCopyChunk"](
                    src_offset=c.src_offset, size=c.size, dst_offset=c.dst_offset, handle_idx=c.handle_idx
                )
                for c in chunks
            )
        for uuid, hs in handles.items():
            request.handles[uuid].handles.extend(messages["MemCopyHandle"](cuda_ipc_handle=h) for h in hs)
        self._call("LoadModelAsync", request, doing="copying the model to the devices")

    def load_replica(
        self,
        model_path: str,
        copies: Dict[str, Sequence[CopyChunk]],
        handles: Dict[str, Sequence[bytes]],
    ) -> None:
        """Copies into the buffers behind `handles` as one new replica and
        waits until it is done. Devices with nothing to copy are left out;
        with nothing at all to copy, no request is sent."""
        copies = {d: c for d, c in copies.items() if c}
        if not copies:
            return
        replica = str(uuidlib.uuid4())
        self.load_to_devices(model_path, replica, copies, {d: handles[d] for d in copies})
        self.confirm(model_path, replica)

    def confirm(self, model_path: str, replica_uuid: str, timeout_s: float = 3600.0) -> None:
        self._call(
            "ConfirmModel",
            messages["ConfirmModelRequest"](
                model_path=model_path, replica_uuid=replica_uuid, target_device_type=DEVICE_TYPE_GPU
            ),
            timeout=timeout_s,
            doing="waiting for the copies",
        )

    def unload(self, model_path: str) -> None:
        self._call(
            "UnloadModel",
            messages["UnloadModelRequest"](model_path=model_path, target_device_type=DEVICE_TYPE_CPU),
            doing="unloading the model",
        )

    def clear(self) -> None:
        self._call("ClearMem", messages["ClearMemRequest"](), doing="clearing the pool")

    def model_status(self, model_path: str) -> dict:
        request = messages["GetModelStatusRequest"](model_path=model_path)
        r = self._call("GetModelStatus", request, doing="asking for the model's status")
        return {
            "model_size": r.model_size,
            "host_state": HOST_STATES.get(r.host_state, str(r.host_state)),
            "chunks_landed": r.chunks_landed,
            "chunks_total": r.chunks_total,
            "host_load_seconds": r.host_load_seconds,
            "error": r.error,
            "replicas_copying": r.replicas_copying,
            "resident_bytes": r.resident_bytes,
            "streamed": r.streamed,
        }
