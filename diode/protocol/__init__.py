"""The receiver's protocol core, sans I/O, one job per module.

A datagram goes through these pieces in this order; each can drop it, and
every drop bumps exactly one ``rejected_<reason>`` counter::

    gate.Gate                 link tag (with a link secret), framing, CRC, the
                              stream's link profile (size, k, n), key id known
    sequencer.StreamSequencer already delivered? an epoch older than followed?
    assembly.AssemblyTable    symbols gathered per block, memory bounded
    budget.VerifyBudget       blocks outside the stream's window: verifies per second
    authenticator.BlockAuthenticator
                              Reed-Solomon rebuild, signed header, Ed25519,
                              decryption, records; failures remembered
    sequencer.StreamSequencer epochs, freshness, order, gaps
    decoder.Decoder           wires them together: receive / poll / deadline /
                              events / positions

Nothing here opens a socket, starts a task or reads a clock: time is passed in.
"""
