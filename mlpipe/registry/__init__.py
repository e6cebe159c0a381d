"""``mlpipe promote``/``rollback``/``history``/``models``: gated alias moves under a registry lock,
with the audit trail kept in the tracking server."""
