# Builds the gateway and the device simulator; one image runs either.
#   docker build -t entente .
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gateway -p device-sim \
 && cp target/release/gateway target/release/device-sim /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/gateway /usr/local/bin/device-sim /usr/local/bin/
VOLUME /data
# REST, peers, MQTT 3.1.1, MQTT 5
EXPOSE 8080 7000 1883 1884
ENTRYPOINT ["gateway"]
