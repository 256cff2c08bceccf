use proptest::prelude::*;

use super::*;

fn json() -> Scanner {
    Scanner::Json(JsonScanner::default())
}

fn multipart() -> Scanner {
    Scanner::Multipart(MultipartScanner::new("XyZ"))
}

/// Feeds `body` in pieces of `piece` bytes; the first answer that is not `More`, else
/// what `finish` says.
fn scan_in_pieces(mut scanner: Scanner, body: &[u8], piece: usize) -> Scan {
    for chunk in body.chunks(piece.max(1)) {
        match scanner.feed(chunk) {
            Scan::More => {}
            scan => return scan,
        }
    }
    scanner.finish()
}

/// Feeds the whole body and then finishes: what the rest-of-body guard would see.
fn scan_whole(mut scanner: Scanner, body: &[u8]) -> Scan {
    scanner.feed(body);
    scanner.finish()
}

fn model(m: &str) -> Scan {
    Scan::Model(m.into())
}

#[test]
fn finds_the_top_level_model_wherever_it_is() {
    let bodies: &[&[u8]] = &[
        br#"{"model":"gpt-4o","messages":[]}"#,
        br#"{"messages":[{"role":"user","content":"say \"model\": x"}],"model":"gpt-4o"}"#,
        br#" { "temperature" : 0.2 , "model" : "gpt-4o" } "#,
        br#"{"metadata":{"model":"nested-is-not-it"},"model":"gpt-4o"}"#,
        br#"{"tools":[{"model":"nope"}],"mod\u0065l":"gpt-4o"}"#,
        br#"{"model":"gpt\u002d4o"}"#,
    ];
    for body in bodies {
        for piece in [1, 2, 3, 7, 1000] {
            assert_eq!(scan_in_pieces(json(), body, piece), model("gpt-4o"), "{}", String::from_utf8_lossy(body));
        }
    }
}

#[test]
fn json_bodies_without_a_usable_model_say_why() {
    let cases: &[(&[u8], Scan)] = &[
        (br#"{"messages":[]}"#, Scan::NoModel),
        (br#"{"input":{"model":"inner"}}"#, Scan::NoModel),
        (br#"["model","gpt-4o"]"#, Scan::Malformed("the body is not a JSON object")),
        (br#"{"model":42}"#, Scan::Malformed("model is not a string")),
        (br#"{"model":["gpt-4o"]}"#, Scan::Malformed("model is not a string")),
        (br#"{"model":null}"#, Scan::Malformed("model is not a string")),
        (br#"{"model":"gpt-4o","model":"o1"}"#, Scan::Malformed("the body names its model twice")),
        (br#"{"model":"gpt-4o","x":1,"mo\u0064el":"o1"}"#, Scan::Malformed("the body names its model twice")),
        (br#"{"model":"a\ud800"}"#, Scan::Malformed("model is not a valid JSON string")),
        (br#"{"messages":[]"#, Scan::NoModel),
    ];
    for (body, want) in cases {
        assert_eq!(&scan_whole(json(), body), want, "{}", String::from_utf8_lossy(body));
    }
    let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(300));
    assert_eq!(scan_whole(json(), long.as_bytes()), Scan::Malformed("model is longer than 256 bytes"));
}

#[test]
fn a_second_model_after_the_first_is_caught_by_the_guard() {
    let mut scanner = json();
    assert_eq!(scanner.feed(br#"{"model":"gpt-4o","messages":[{"content":"#), model("gpt-4o"));
    assert_eq!(scanner.feed(br#""hi"}],"#), model("gpt-4o"));
    assert_eq!(scanner.feed(br#""model":"o1"}"#), Scan::Malformed("the body names its model twice"));
}

fn form(parts: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in parts {
        let disposition = if *name == "file" {
            r#"form-data; name="file"; filename="a.mp3""#.to_string()
        } else {
            format!(r#"form-data; name="{name}""#)
        };
        body.extend_from_slice(format!("--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n").as_bytes());
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    body
}

#[test]
fn finds_the_model_field_of_a_multipart_form() {
    let audio = "\r\n--Xy not a delimiter \u{0}\u{1} name=\"model\"\r\n\r\n".repeat(50);
    let bodies = [
        form(&[("model", "whisper-1"), ("file", &audio)]),
        form(&[("file", &audio), ("language", "en"), ("model", "whisper-1")]),
        [b"preamble\r\n".as_slice(), &form(&[("model", "whisper-1")])].concat(),
    ];
    for body in &bodies {
        for piece in [1, 3, 5, 64, 100_000] {
            assert_eq!(scan_in_pieces(multipart(), body, piece), model("whisper-1"));
        }
    }
}

#[test]
fn multipart_forms_without_a_usable_model_say_why() {
    assert_eq!(scan_whole(multipart(), &form(&[("file", "abc")])), Scan::NoModel);
    assert_eq!(
        scan_whole(multipart(), &form(&[("model", "whisper-1"), ("model", "gpt-4o-transcribe")])),
        Scan::Malformed("the body names its model twice")
    );
    let truncated = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc";
    assert_eq!(
        scan_whole(multipart(), truncated),
        Scan::Malformed("the multipart body ends without its closing delimiter")
    );
    let long = form(&[("model", &"m".repeat(300))]);
    assert_eq!(scan_whole(multipart(), &long), Scan::Malformed("model is longer than 256 bytes"));
}

#[test]
fn each_endpoint_says_where_its_model_is() {
    let json = Some(b"application/json; charset=utf-8".as_slice());
    let form = Some(b"multipart/form-data; boundary=\"abc\"".as_slice());
    assert!(matches!(source(&Method::POST, "/v1/chat/completions", json), Source::Body(Scanner::Json(_))));
    assert!(matches!(source(&Method::POST, "/v1/audio/transcriptions", form), Source::Body(Scanner::Multipart(_))));
    assert_eq!(source(&Method::POST, "/v1/embeddings", Some(b"text/plain")), Source::UnknownFormat);
    assert_eq!(source(&Method::POST, "/v1/audio/transcriptions", Some(b"multipart/form-data")), Source::UnknownFormat);
    assert_eq!(source(&Method::GET, "/v1/models/gpt-4o", None), Source::Path("gpt-4o".into()));
    assert_eq!(source(&Method::GET, "/v1/models", None), Source::Nothing);
    assert_eq!(source(&Method::GET, "/v1/chat/completions", None), Source::Nothing, "listing stored completions");
    assert_eq!(source(&Method::POST, "/v1/files", form), Source::Nothing);
    assert_eq!(source(&Method::POST, "/v1/batches", json), Source::Hidden);
}

proptest! {
    /// Whatever surrounds it and however the body is cut, the top-level model is found.
    #[test]
    fn the_model_is_found_across_any_split(
        before in prop::collection::vec(("[a-z_]{1,8}", "[ -~]{0,20}"), 0..4),
        after in prop::collection::vec(("[a-z_]{1,8}", "[ -~]{0,20}"), 0..4),
        name in "[A-Za-z0-9][-A-Za-z0-9._:/]{0,40}",
        piece in 1usize..40,
    ) {
        let field = |(k, v): &(String, String)| format!("{}:{}", serde_json::json!(format!("x{k}")), serde_json::json!(v));
        let mut fields: Vec<String> = before.iter().map(field).collect();
        fields.push(format!(r#""model":{}"#, serde_json::json!(name)));
        fields.extend(after.iter().map(field));
        let body = format!("{{{}}}", fields.join(","));
        prop_assert_eq!(scan_in_pieces(json(), body.as_bytes(), piece), Scan::Model(name));
    }

    /// Arbitrary bytes never panic either scanner.
    #[test]
    fn scanners_survive_any_bytes(body in prop::collection::vec(any::<u8>(), 0..400), piece in 1usize..50) {
        let _ = scan_in_pieces(json(), &body, piece);
        let _ = scan_in_pieces(multipart(), &body, piece);
    }
}

/// Bodies other parsers read differently are refused, not guessed at (from a review:
/// each of these once let a hidden model through).
#[test]
fn bodies_other_parsers_read_differently_are_refused() {
    // UTF-16: Python's json.loads decodes it; to a byte scanner it is something else.
    let utf16: Vec<u8> = r#"{"model":"o1-pro"}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert_eq!(scan_whole(json(), &utf16), Scan::Malformed("the body is not the UTF-8 JSON the proxy reads"));
    // Two boundaries: which one counts depends on the parser.
    let two = Some(b"multipart/form-data; boundary=A; boundary=B".as_slice());
    assert_eq!(source(&Method::POST, "/v1/audio/transcriptions", two), Source::UnknownFormat);
    let quoted = Some(b"multipart/form-data; x=\"; boundary=A\"; boundary=B".as_slice());
    assert!(matches!(source(&Method::POST, "/v1/audio/transcriptions", quoted), Source::Body(Scanner::Multipart(_))));
    // A quoted `;` does not hide the real name; two names or two dispositions are refused.
    let hidden =
        b"--XyZ\r\nContent-Disposition: form-data; foo=\"; name=x\"; name=\"model\"\r\n\r\no1-pro\r\n--XyZ--\r\n";
    assert_eq!(scan_whole(multipart(), hidden), model("o1-pro"));
    let two_names = b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"; name=\"model\"\r\n\r\no1-pro\r\n--XyZ--\r\n";
    let refused = Scan::Malformed("a multipart part names its field more than once");
    assert_eq!(scan_whole(multipart(), two_names), refused);
    let two_headers =
        b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\no1\r\n--XyZ--\r\n";
    assert_eq!(scan_whole(multipart(), two_headers), refused);
    // Text after a delimiter on its line: Go's parser reads that line as content.
    let line = Scan::Malformed("a multipart delimiter line holds more than the delimiter");
    let closing = [form(&[("model", "whisper-1")]).strip_suffix(b"--XyZ--\r\n").unwrap(), b"--XyZ--x\r\n"].concat();
    assert_eq!(scan_whole(multipart(), &closing), line);
    let opening = b"--XyZ junk\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
    assert_eq!(scan_whole(multipart(), opening), line);
    // Transport padding is allowed.
    let padded = b"--XyZ \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ-- \r\n";
    assert_eq!(scan_whole(multipart(), padded), model("whisper-1"));
}
