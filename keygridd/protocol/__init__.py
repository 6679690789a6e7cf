"""The wire: call table, MessagePack codec and framing. No I/O here."""
