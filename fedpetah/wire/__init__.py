"""What crosses a process or a network: message names and typed requests/replies (protocol), the device worker's
socket frames (frames), the flat run config (flatconfig) and every rejection's reason (reasons). No torch."""
