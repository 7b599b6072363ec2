//! The metrics endpoint's HTTP/1.1, without sockets.
//!
//! An [`Exchange`] is one client's conversation: bytes go in
//! ([`Exchange::on_bytes`], [`Exchange::on_eof`]), bytes to send come out
//! ([`Exchange::pending`], [`Exchange::on_written`]), and
//! [`Exchange::wants`] says what the socket should wait for next. It never
//! touches a socket, so every path (partial requests, pipelining, an
//! endless header, garbage) is a unit test or a fuzz case, not a race.
//!
//! The rules that keep a metrics client from costing the server:
//! - a request is at most [`MAX_REQUEST`] bytes, head included; a client
//!   that sends more without finishing its header gets `431` and is
//!   closed, so an endless header costs at most that much memory;
//! - one request is answered at a time: while a response is pending the
//!   exchange takes no input ([`Exchange::room`] is 0), the same
//!   back-pressure the echo server applies;
//! - a request body is refused (`400`): `GET /metrics` has none.
//!
//! Parsing is `httparse`'s; this module only decides what to answer.

/// Most bytes of one request (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 32;

/// What one parse of the input found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Incomplete,
    /// A complete request: answer it, then drop `consumed` bytes of input.
    Request {
        /// Bytes this request took.
        consumed: usize,
        /// What to answer.
        route: Route,
        /// `HEAD`: headers only.
        head_only: bool,
        /// The client asked to close after this response (or spoke HTTP/1.0).
        close: bool,
    },
    /// The input is not an acceptable request: answer with this status and close.
    Error(Status),
}

/// The answer to a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// Any other path: 404.
    NotFound,
    /// A method other than GET or HEAD: 405.
    MethodNotAllowed,
}

/// The error statuses an exchange can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Malformed request, or one with a body.
    BadRequest,
    /// The head did not fit in [`MAX_REQUEST`] or had too many headers.
    HeaderTooLarge,
}

/// Parses the request at the start of `input`.
pub fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Error(Status::HeaderTooLarge),
        Err(_) => return Parsed::Error(Status::BadRequest),
    };
    // httparse only reports Complete once method, path and version are set.
    let (method, path, version) = match (req.method, req.path, req.version) {
        (Some(m), Some(p), Some(v)) => (m, p, v),
        _ => return Parsed::Error(Status::BadRequest),
    };
    let mut close = version == 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Only an explicit empty body is acceptable.
            if h.value.trim_ascii() != b"0" {
                return Parsed::Error(Status::BadRequest);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Error(Status::BadRequest);
        } else if name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let head_only = method == "HEAD";
    let route = if method != "GET" && !head_only {
        Route::MethodNotAllowed
    } else if path.split('?').next() == Some("/metrics") {
        Route::Metrics
    } else {
        Route::NotFound
    };
    Parsed::Request {
        consumed,
        route,
        head_only,
        close,
    }
}

/// A complete HTTP/1.1 response with a `Content-Length`.
pub fn response(
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    close: bool,
    extra_headers: &str,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}{extra_headers}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// What the socket should wait for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Input: nothing is owed to the client.
    Read,
    /// Output is pending: write it, and read nothing until it is gone.
    Write,
    /// Everything owed was sent and the exchange is over: close.
    Close,
}

/// One client's exchange: the request bytes received so far (at most
/// [`MAX_REQUEST`]) and the response not yet written.
#[derive(Debug, Default)]
pub struct Exchange {
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Close once `output` is written: the client asked, erred or left.
    closing: bool,
    /// The client closed its side.
    eof: bool,
    /// Responses completed, for logs and tests.
    answered: u64,
}

impl Exchange {
    /// What the socket should wait for.
    pub fn wants(&self) -> Want {
        if self.written < self.output.len() {
            Want::Write
        } else if self.closing {
            Want::Close
        } else {
            Want::Read
        }
    }

    /// How many more input bytes are welcome now: 0 while a response is
    /// pending or once closing, so the socket is not read meanwhile.
    pub fn room(&self) -> usize {
        if self.wants() == Want::Read {
            MAX_REQUEST - self.input.len()
        } else {
            0
        }
    }

    /// Bytes read from the client. `data` must fit in [`Exchange::room`];
    /// `metrics` renders the exposition if a request asks for it.
    pub fn on_bytes(&mut self, data: &[u8], metrics: &mut dyn FnMut() -> String) {
        debug_assert!(data.len() <= self.room());
        let fit = data.len().min(self.room());
        self.input.extend_from_slice(&data[..fit]);
        self.answer(metrics);
    }

    /// The client closed its side: finish what is owed, then close.
    /// A half-sent request is simply dropped.
    pub fn on_eof(&mut self) {
        self.closing = true;
        self.eof = true;
    }

    /// Whether the client has closed its side ([`Exchange::on_eof`]).
    pub fn peer_closed(&self) -> bool {
        self.eof
    }

    /// The bytes still to write.
    pub fn pending(&self) -> &[u8] {
        &self.output[self.written..]
    }

    /// `n` bytes of [`Exchange::pending`] were written. Once a response is
    /// complete, a request pipelined behind it is answered.
    pub fn on_written(&mut self, n: usize, metrics: &mut dyn FnMut() -> String) {
        self.written = (self.written + n).min(self.output.len());
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            self.answer(metrics);
        }
    }

    /// Responses fully handed to [`Exchange::on_written`] or queued.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// Answers the request at the front of the input, if there is one and
    /// nothing else is pending.
    fn answer(&mut self, metrics: &mut dyn FnMut() -> String) {
        if self.wants() != Want::Read {
            return;
        }
        let (status, body, head_only, close, extra): (_, Vec<u8>, _, _, _) =
            match parse(&self.input) {
                Parsed::Incomplete if self.input.len() < MAX_REQUEST => return,
                Parsed::Incomplete | Parsed::Error(Status::HeaderTooLarge) => (
                    "431 Request Header Fields Too Large",
                    b"request too large\n".to_vec(),
                    false,
                    true,
                    "",
                ),
                Parsed::Error(Status::BadRequest) => (
                    "400 Bad Request",
                    b"bad request\n".to_vec(),
                    false,
                    true,
                    "",
                ),
                Parsed::Request {
                    consumed,
                    route,
                    head_only,
                    close,
                } => {
                    self.input.drain(..consumed);
                    match route {
                        Route::Metrics => {
                            self.output = response(
                                "200 OK",
                                super::render::CONTENT_TYPE,
                                metrics().as_bytes(),
                                head_only,
                                close,
                                "",
                            );
                            self.answered += 1;
                            self.closing = close;
                            return;
                        }
                        Route::NotFound => (
                            "404 Not Found",
                            b"not found: try /metrics\n".to_vec(),
                            head_only,
                            close,
                            "",
                        ),
                        Route::MethodNotAllowed => (
                            "405 Method Not Allowed",
                            b"method not allowed\n".to_vec(),
                            false,
                            close,
                            "Allow: GET, HEAD\r\n",
                        ),
                    }
                }
            };
        self.output = response(
            status,
            "text/plain; charset=utf-8",
            &body,
            head_only,
            close,
            extra,
        );
        self.answered += 1;
        self.closing = close;
        if close {
            // Nothing after an error is read; the buffer can go now.
            self.input = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> impl FnMut() -> String {
        || "reactor_up 1\n".to_string()
    }

    /// Feeds `input` in pieces of `step` bytes, writing out every response
    /// at once; returns everything "sent".
    fn run(ex: &mut Exchange, input: &[u8], step: usize) -> Vec<u8> {
        let mut m = metrics();
        let mut sent = Vec::new();
        let mut rest = input;
        loop {
            while ex.wants() == Want::Write {
                let out = ex.pending().to_vec();
                sent.extend_from_slice(&out);
                ex.on_written(out.len(), &mut m);
            }
            if rest.is_empty() || ex.room() == 0 {
                return sent;
            }
            let n = step.min(rest.len()).min(ex.room());
            ex.on_bytes(&rest[..n], &mut m);
            rest = &rest[n..];
        }
    }

    mod parsing {
        use super::super::*;

        #[test]
        fn get_metrics_is_routed_and_keeps_the_connection() {
            assert_eq!(
                parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                Parsed::Request {
                    consumed: 34,
                    route: Route::Metrics,
                    head_only: false,
                    close: false
                }
            );
        }

        #[test]
        fn a_query_string_is_ignored_and_other_paths_are_not_found() {
            let route = |req: &[u8]| match parse(req) {
                Parsed::Request { route, .. } => route,
                other => panic!("{other:?}"),
            };
            assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
            assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
            assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
            assert_eq!(
                route(b"POST /metrics HTTP/1.1\r\n\r\n"),
                Route::MethodNotAllowed
            );
        }

        #[test]
        fn http_1_0_and_connection_close_end_the_connection() {
            for req in [
                &b"GET /metrics HTTP/1.0\r\n\r\n"[..],
                b"GET /metrics HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
            ] {
                assert!(matches!(parse(req), Parsed::Request { close: true, .. }));
            }
        }

        #[test]
        fn a_half_request_is_incomplete_and_garbage_is_bad() {
            assert_eq!(parse(b"GET /metr"), Parsed::Incomplete);
            assert_eq!(parse(b""), Parsed::Incomplete);
            assert_eq!(
                parse(b"\x00\x01\x02 nonsense\r\n\r\n"),
                Parsed::Error(Status::BadRequest)
            );
        }

        #[test]
        fn a_body_is_refused() {
            assert_eq!(
                parse(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
                Parsed::Error(Status::BadRequest)
            );
            assert_eq!(
                parse(b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
                Parsed::Error(Status::BadRequest)
            );
            assert!(matches!(
                parse(b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
                Parsed::Request { .. }
            ));
        }

        #[test]
        fn too_many_headers_is_too_large() {
            let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
            for i in 0..=MAX_HEADERS {
                req.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            assert_eq!(parse(&req), Parsed::Error(Status::HeaderTooLarge));
        }
    }

    mod reading {
        use super::*;

        #[test]
        fn a_request_in_one_byte_pieces_gets_one_response() {
            let mut ex = Exchange::default();
            let sent = run(&mut ex, b"GET /metrics HTTP/1.1\r\n\r\n", 1);
            let text = String::from_utf8(sent).unwrap();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.contains("Content-Type: text/plain; version=0.0.4"));
            assert!(text.contains("Content-Length: 13\r\n"));
            assert!(text.ends_with("\r\n\r\nreactor_up 1\n"));
            assert_eq!(ex.wants(), Want::Read, "keep-alive: wait for the next");
        }

        #[test]
        fn an_endless_header_gets_431_and_a_close_within_the_bound() {
            let mut ex = Exchange::default();
            let mut m = metrics();
            let mut fed = 0;
            let junk = [b'a'; 1000];
            ex.on_bytes(b"GET /metrics HTTP/1.1\r\nX: ", &mut m);
            while ex.room() > 0 {
                let n = ex.room().min(junk.len());
                ex.on_bytes(&junk[..n], &mut m);
                fed += n;
                assert!(fed <= MAX_REQUEST, "input is bounded");
            }
            assert_eq!(ex.wants(), Want::Write);
            assert!(ex.pending().starts_with(b"HTTP/1.1 431 "));
            assert!(ex.input.capacity() == 0, "the request buffer is freed");
            let n = ex.pending().len();
            ex.on_written(n, &mut m);
            assert_eq!(ex.wants(), Want::Close);
            assert_eq!(ex.room(), 0, "nothing more is read");
        }

        #[test]
        fn eof_before_a_full_request_closes_without_answering() {
            let mut ex = Exchange::default();
            run(&mut ex, b"GET /met", 100);
            ex.on_eof();
            assert_eq!(ex.wants(), Want::Close);
            assert_eq!(ex.answered(), 0);
        }
    }

    mod writing {
        use super::*;

        #[test]
        fn nothing_is_read_while_a_response_is_pending() {
            let mut ex = Exchange::default();
            let mut m = metrics();
            ex.on_bytes(b"GET /metrics HTTP/1.1\r\n\r\n", &mut m);
            assert_eq!(ex.wants(), Want::Write);
            assert_eq!(ex.room(), 0);
            // A short write keeps the rest.
            let total = ex.pending().len();
            ex.on_written(10, &mut m);
            assert_eq!(ex.pending().len(), total - 10);
            ex.on_written(total - 10, &mut m);
            assert_eq!(ex.wants(), Want::Read);
        }

        #[test]
        fn pipelined_requests_are_answered_in_order() {
            let mut ex = Exchange::default();
            let sent = run(
                &mut ex,
                b"GET /nope HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
                7,
            );
            let text = String::from_utf8(sent).unwrap();
            let statuses: Vec<&str> = text.matches("HTTP/1.1 ").collect();
            assert_eq!(statuses.len(), 3, "{text}");
            let a = text.find("404 Not Found").unwrap();
            let b = text.find("200 OK").unwrap();
            assert!(a < b);
            assert_eq!(text.matches("reactor_up 1").count(), 1, "HEAD has no body");
            assert_eq!(ex.wants(), Want::Close);
        }

        #[test]
        fn a_bad_request_is_answered_then_closed() {
            let mut ex = Exchange::default();
            let sent = run(&mut ex, b"BLAH\r\n\r\n", 100);
            assert!(sent.starts_with(b"HTTP/1.1 400 "));
            assert_eq!(ex.wants(), Want::Close);
        }

        #[test]
        fn other_methods_get_405_with_allow() {
            let mut ex = Exchange::default();
            let sent = run(&mut ex, b"DELETE /metrics HTTP/1.1\r\n\r\n", 100);
            let text = String::from_utf8(sent).unwrap();
            assert!(text.starts_with("HTTP/1.1 405 "));
            assert!(text.contains("Allow: GET, HEAD\r\n"));
        }
    }

    mod fuzzing {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever arrives, in whatever pieces: no panic, input stays
            /// bounded, and every response is a well-formed status line.
            #[test]
            fn any_input_is_bounded_and_answered_sanely(
                input in proptest::collection::vec(any::<u8>(), 0..20_000),
                step in 1usize..4096,
                valid_prefix in any::<bool>(),
            ) {
                let mut ex = Exchange::default();
                let mut data = if valid_prefix { b"GET /metrics HTTP/1.1\r\n".to_vec() } else { Vec::new() };
                data.extend_from_slice(&input);
                let sent = run(&mut ex, &data, step);
                prop_assert!(ex.input.len() <= MAX_REQUEST);
                if !sent.is_empty() {
                    prop_assert!(sent.starts_with(b"HTTP/1.1 "));
                }
            }
        }
    }
}
