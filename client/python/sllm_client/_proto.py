"""The storage.Storage messages and a client stub, built from the embedded
FileDescriptorProto (see tools/gen_proto.py for why not protoc's gencode)."""

from google.protobuf import descriptor_pb2, descriptor_pool

from ._descriptor import SERIALIZED_FILE_DESCRIPTOR

_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(SERIALIZED_FILE_DESCRIPTOR))


def _message_class(name: str):
    descriptor = _POOL.FindMessageTypeByName(f"storage.{name}")
    try:
        from google.protobuf.message_factory import GetMessageClass  # protobuf >= 4.21
    except ImportError:  # pragma: no cover - older protobuf
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(_POOL).GetPrototype(descriptor)
    return GetMessageClass(descriptor)


_NAMES = [
    "GetServerConfigRequest", "GetServerConfigResponse", "RegisterModelRequest",
    "RegisterModelResponse", "MemCopyChunk", "MemCopyChunkList", "MemCopyHandle",
    "MemCopyHandleList", "LoadModelRequest", "LoadModelResponse", "ConfirmModelRequest",
    "ConfirmModelResponse", "UnloadModelRequest", "UnloadModelResponse", "ClearMemRequest",
    "ClearMemResponse", "GetModelStatusRequest", "GetModelStatusResponse",
]
messages = {name: _message_class(name) for name in _NAMES}

DEVICE_TYPE_CPU = _POOL.FindEnumTypeByName("storage.DeviceType").values_by_name["DEVICE_TYPE_CPU"].number
DEVICE_TYPE_GPU = _POOL.FindEnumTypeByName("storage.DeviceType").values_by_name["DEVICE_TYPE_GPU"].number
HOST_STATES = {v.number: v.name for v in _POOL.FindEnumTypeByName("storage.HostState").values}


class StorageStub:
    """Calls of the storage.Storage service (one attribute per RPC)."""

    def __init__(self, channel):
        service = _POOL.FindServiceByName("storage.Storage")
        for method in service.methods:
            request = messages[method.input_type.name]
            response = messages[method.output_type.name]
            setattr(
                self,
                method.name,
                channel.unary_unary(
                    f"/storage.Storage/{method.name}",
                    request_serializer=request.SerializeToString,
                    response_deserializer=response.FromString,
                ),
            )
