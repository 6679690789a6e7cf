"""Python clients of keygridd: a blocking one (``connect``) and a trio one (``open_client``)."""

from keygridd.client.protocol import DEFAULT_SOCKET, ProtocolError, default_socket
from keygridd.client.sync import Client, connect

__all__ = ["DEFAULT_SOCKET", "Client", "ProtocolError", "connect", "default_socket"]
