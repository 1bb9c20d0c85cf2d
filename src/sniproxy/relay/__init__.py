"""How bytes move once both ends of a connection are connected, behind one `Relay` protocol.

`base` (the protocol, RelayResult), `userspace` (splice(2) / copy), `sockmap` (sk_skb redirect in
the kernel), `choose` (which relay a connection gets, and why not the others). `proxy/` asks this
package for a relay and never sees maps or ctypes.
"""
