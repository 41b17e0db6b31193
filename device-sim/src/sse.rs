//! Server-Sent Events: an incremental parser and a reader over a streaming
//! HTTP response (the gateway's `GET /v1/events`).

use anyhow::{Context, Result};

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `id:` (the gateway sends the log index).
    pub id: Option<String>,
    /// `event:` (the kind, e.g. `command.result`); `message` if absent.
    pub event: String,
    /// `data:` lines joined with newlines.
    pub data: String,
}

/// Splits a byte stream into events (fields per the SSE specification;
/// comments and unknown fields are skipped).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feeds bytes; returns the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            if let Some(e) = parse_block(&String::from_utf8_lossy(&block)) {
                events.push(e);
            }
        }
        events
    }
}

/// Where the first event ends: the index of the blank line and the length
/// of the separator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        for sep in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buf[i..].starts_with(sep) {
                return Some((i, sep.len()));
            }
        }
        i += 1;
    }
    None
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut event = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => id = Some(value.to_string()),
            "event" => event = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    // A block with only comments (keep-alives) is no event.
    if id.is_none() && event.is_none() && data.is_none() {
        return None;
    }
    Some(SseEvent {
        id,
        event: event.unwrap_or_else(|| "message".into()),
        data: data.unwrap_or_default(),
    })
}

/// Reads events from a streaming response.
#[derive(Debug)]
pub struct SseReader {
    res: reqwest::Response,
    parser: SseParser,
    ready: std::collections::VecDeque<SseEvent>,
}

impl SseReader {
    /// Reads `res` (an open `text/event-stream` response).
    pub fn new(res: reqwest::Response) -> SseReader {
        SseReader {
            res,
            parser: SseParser::default(),
            ready: Default::default(),
        }
    }

    /// The next event; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<SseEvent>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(Some(e));
            }
            match self.res.chunk().await.context("reading the event stream")? {
                Some(bytes) => self.ready.extend(self.parser.push(&bytes)),
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_comments_skipped() {
        let mut p = SseParser::default();
        assert!(
            p.push(b": keep-alive\n\nid: 5\nevent: command.re")
                .is_empty()
        );
        let e =
            p.push(b"sult\ndata: {\"a\":1}\n\nid: 6\r\nevent: x\r\ndata: one\r\ndata: two\r\n\r\n");
        assert_eq!(
            e,
            vec![
                SseEvent {
                    id: Some("5".into()),
                    event: "command.result".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    id: Some("6".into()),
                    event: "x".into(),
                    data: "one\ntwo".into()
                }
            ]
        );
        let plain = p.push(b"data:x\n\n");
        assert_eq!(plain[0].event, "message");
        assert_eq!(plain[0].data, "x");
    }
}
