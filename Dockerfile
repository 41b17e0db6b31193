# Builds the gateway and the device simulator; one image runs either.
#   docker build -t entente .
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gateway -p device-sim \
 && cp target/release/gateway target/release/device-sim /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 entente \
 && useradd --system --uid 10001 --gid entente --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin entente \
 && mkdir -p /data && chown entente:entente /data && chmod 0700 /data
COPY --from=build /usr/local/bin/gateway /usr/local/bin/device-sim /usr/local/bin/
# Not root. A named volume mounted at /data starts as this directory
# (owned by entente, 0700); the gateway keeps its files 0600 there.
USER 10001:10001
ENV ENTENTE_DATA_DIR=/data
VOLUME /data
WORKDIR /data
# REST, peers, devices (each device port serves MQTT 3.1.1 and 5)
EXPOSE 8080 7000 1883 1884
# The gateway stops gracefully on SIGTERM (docker stop) and on SIGINT:
# devices are told (MQTT 5: DISCONNECT 0x8B), requests in flight answered,
# the log flushed; it takes at most the write timeout + a few seconds. A
# second signal exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
