"""Echo worker: every message goes back to its sender, text as text, binary as binary."""

import warpsocket


def handle_text_message(text: str, socket_id: int) -> None:
    warpsocket.send(socket_id, text)


def handle_binary_message(data: bytes, socket_id: int) -> None:
    warpsocket.send(socket_id, data)
