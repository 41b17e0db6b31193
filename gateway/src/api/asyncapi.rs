//! `GET /asyncapi.json`: the device contract — topics, payloads, the command
//! lifecycle, reason codes — as the AsyncAPI 3.0 document of
//! `entente_protocol::asyncapi`, with this gateway's device listeners as its
//! servers. Public, like `/openapi.json`.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, OnceLock};

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use entente_protocol::asyncapi::{self, Host, Server};
use serde_json::Value;

use super::AppState;
use crate::config::Config;

/// The addresses the device listeners are bound to, known once they are
/// (after the REST listener opens): `gateway::start` sets them. Until then,
/// or in a router built without them, the configured addresses are used.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceListeners(Arc<OnceLock<Bound>>);

/// The bound device listeners.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    /// `--mqtt-listen`.
    pub(crate) mqtt: Option<SocketAddr>,
    /// `--mqtt5-listen`.
    pub(crate) mqtt5: Option<SocketAddr>,
    /// `--mqtt-tls-listen` (open only with a certificate).
    pub(crate) tls: Option<SocketAddr>,
}

impl DeviceListeners {
    /// Records the bound addresses (the first call wins).
    pub(crate) fn set(&self, bound: Bound) {
        let _ = self.0.set(bound);
    }
}

/// The document without servers, built once.
static DOCUMENT: LazyLock<Value> = LazyLock::new(|| asyncapi::document_with(&[]));

/// The servers entries for `bound` (or the configuration's addresses):
/// a listener on a specific address is given as such; one on every
/// interface gets the host variable, its default the host this request was
/// addressed to (when it is a plain host name or address), else
/// `localhost`. A port 0 (not bound yet) is left out.
fn servers(config: &Config, bound: Option<Bound>, request_host: Option<&str>) -> Vec<Server> {
    let bound = bound.unwrap_or(Bound {
        mqtt: config.mqtt_listen,
        mqtt5: config.mqtt5_listen,
        tls: config.mqtt_tls_cert.as_ref().and(config.mqtt_tls_listen),
    });
    let default = request_host.unwrap_or("localhost").to_owned();
    let host = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            Host::AnyInterface {
                port: a.port(),
                default: default.clone(),
            }
        } else {
            Host::Fixed(a.to_string())
        }
    };
    let listeners = [
        ("mqtt", bound.mqtt, false, "3.1.1"),
        ("mqtt5", bound.mqtt5, false, "5"),
        ("mqtts", bound.tls, true, "5"),
    ];
    listeners
        .into_iter()
        .filter_map(|(name, addr, tls, version)| {
            let addr = addr.filter(|a| a.port() != 0)?;
            Some(Server {
                name: name.into(),
                host: host(addr),
                tls,
                client_certificates: tls && config.mqtt_tls_client_ca.is_some(),
                protocol_version: version,
            })
        })
        .collect()
}

/// The host name of a `Host` header, if it is a plain DNS name or IP
/// address (anything else is not echoed into the document).
fn host_of(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::HOST)?.to_str().ok()?;
    let host = if let Some(rest) = value.strip_prefix('[') {
        // [IPv6]:port
        let end = rest.find(']')?;
        &value[..end + 2]
    } else {
        value.rsplit_once(':').map_or(value, |(h, _)| h)
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
    (!host.is_empty() && host.len() <= 253 && host.chars().all(plain)).then_some(host)
}

/// The device contract (MQTT) as an AsyncAPI 3.0 document.
#[utoipa::path(
    get, path = "/asyncapi.json", tag = "health", security(()),
    responses((status = 200, description = "The AsyncAPI 3.0 document of the device contract (MQTT): \
topics, payloads, the command lifecycle, reason codes, this gateway's device listeners as servers",
        content_type = "application/json", body = Object))
)]
pub(crate) async fn asyncapi_json(
    State(state): State<AppState>,
    listeners: Option<Extension<DeviceListeners>>,
    headers: HeaderMap,
) -> Response {
    let bound = listeners.and_then(|Extension(l)| l.0.get().copied());
    let mut doc = DOCUMENT.clone();
    let servers = servers(&state.config, bound, host_of(&headers));
    doc["servers"] = asyncapi::servers_json(&servers);
    let mut res = (StatusCode::OK, doc.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_follow_the_listeners() {
        let mut config = Config::single(
            "unused".into(),
            "0.0.0.0:8080".parse().expect("addr"),
            "127.0.0.1:7000".parse().expect("addr"),
        );
        config.mqtt_listen = Some("0.0.0.0:1883".parse().expect("addr"));
        config.mqtt5_listen = Some("10.0.0.1:1884".parse().expect("addr"));
        config.mqtt_tls_listen = Some("0.0.0.0:8883".parse().expect("addr"));
        // No certificate: no TLS listener.
        let s = servers(&config, None, Some("gw1.example"));
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["mqtt", "mqtt5"]);
        assert_eq!(
            s[0].host,
            Host::AnyInterface {
                port: 1883,
                default: "gw1.example".into()
            }
        );
        assert_eq!(s[1].host, Host::Fixed("10.0.0.1:1884".into()));
        // A certificate and a client CA: mqtts, with certificates.
        config.mqtt_tls_cert = Some("cert.pem".into());
        config.mqtt_tls_client_ca = Some("ca.pem".into());
        let s = servers(&config, None, None);
        let tls = s.iter().find(|s| s.name == "mqtts").expect("mqtts");
        assert!(tls.tls && tls.client_certificates);
        assert_eq!(
            tls.host,
            Host::AnyInterface {
                port: 8883,
                default: "localhost".into()
            }
        );
        // Bound addresses win over the configuration; port 0 is left out.
        let bound = Bound {
            mqtt: Some("127.0.0.1:41883".parse().expect("addr")),
            mqtt5: Some("127.0.0.1:0".parse().expect("addr")),
            tls: None,
        };
        let s = servers(&config, Some(bound), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].host, Host::Fixed("127.0.0.1:41883".into()));
    }

    #[test]
    fn only_plain_hosts_are_echoed() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_str(v).expect("header"));
            host_of(&m).map(str::to_owned)
        };
        assert_eq!(h("gw1.example:8080").as_deref(), Some("gw1.example"));
        assert_eq!(h("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(h("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(h("evil\"host:80"), None);
        assert_eq!(h("a b"), None);
        assert_eq!(h(""), None);
        assert_eq!(h(&"a".repeat(300)), None);
    }
}
