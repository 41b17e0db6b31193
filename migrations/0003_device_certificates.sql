-- Devices may log in over TLS with a client certificate: `cert_sha256` is
-- the SHA-256 (lowercase hex) of the device's DER certificate, NULL for
-- none. One certificate identifies one device. A device registered with a
-- certificate only has an empty `secret_hash`, which no password matches.
ALTER TABLE devices ADD COLUMN cert_sha256 TEXT;

CREATE UNIQUE INDEX devices_cert ON devices (cert_sha256) WHERE cert_sha256 IS NOT NULL;
