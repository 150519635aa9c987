//! The web chat page (assets/chat.html) in a real browser: headless Chromium driven over
//! WebDriver (fantoccini talking to chromedriver) against a `chatloop` started with `--listen`
//! and `--ws-listen`.
//!
//! - [`two_browsers_and_a_terminal_client_chat`]: alice and bob log in from two browser
//!   sessions, join rooms (by `/join` and by the join form), see each other's presence and
//!   member lists, exchange messages and a whisper; carol, a `chatloop-client` on plain TCP in
//!   the same room, sees the browsers' messages and they see hers. Text from the network is
//!   shown as text, never parsed as HTML. Saves a screenshot of alice's window to
//!   target/browser-web-chat.png and, with `CHATLOOP_SAVE_SCREENSHOT=1`, to docs/web-chat.png.
//! - [`phone_sized_window_is_usable`]: on a 375x667 phone screen (emulated), after login, the
//!   log and the composer are within the viewport, a message can be sent, and the member list
//!   opens from the ☰ button.
//! - [`a_dropped_connection_reconnects_and_says_what_happened`]: a relay between the browser
//!   and the server cuts the page's WebSocket. Cut on the browser's side only (the server
//!   still holds the session), the page resumes it with its token and says so, and a TCP
//!   client in the room saw no PRESENCE; cut on both sides (the server ends the session:
//!   PRESENCE gone), the page starts a new session, rejoins its rooms and says that messages
//!   sent meanwhile were missed.
//! - [`messages_missed_while_away_are_recovered_in_order`]: with `--resume-window` and
//!   `--history`, the relay cuts both sides (the server holds the session) and holds the
//!   page's reconnect back while a TCP client says three things and whispers; the page resumes
//!   the session, shows the three (marked `recovered`), once each and in order, then
//!   "* recovered 3 messages", and the whisper; a message that arrives live while its HISTORY
//!   is answered (the page's request is held back to make sure), and what is said afterwards,
//!   come after them; the TCP client saw no PRESENCE of the page's nick. Then joining another room shows the
//!   messages said there before (marked `history`) above the JOIN's line.
//!
//! Needs `chromedriver` on PATH and the Chromium it drives (Debian: `apt-get install chromium
//! chromium-driver`; .ci/run installs them). Without them the tests fail, as the cluster tests
//! do without `redis-server`. Each test starts its own server and its own chromedriver on a
//! free loopback port and ends both (and the browser sessions) when it ends, also on panic.
//! Every wait polls the page with a deadline ([`WAIT`]); nothing sleeps for a fixed time.

mod common;

use std::cell::RefCell;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Exe, STARTUP_TIMEOUT, Server};
use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Bound for everything awaited: a page element, a log line, a client's output line.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// The desktop viewport (the screenshot's size).
const DESKTOP: (u32, u32) = (1100, 700);
/// The phone's screen, emulated: Chromium's windows are at least 500 px wide.
const PHONE: (u32, u32) = (375, 667);

/// The value, or a panic saying what failed.
fn must<T, E: Display>(r: Result<T, E>, what: impl Display) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `chatloop --listen 127.0.0.1:0 --ws-listen 127.0.0.1:0` and the URL of its chat page.
fn start_server() -> (Server, String) {
    start_server_with(&[])
}

/// [`start_server`] with more flags.
fn start_server_with(args: &[&str]) -> (Server, String) {
    let server = Server::start(&[&["--ws-listen", "127.0.0.1:0"], args].concat());
    let line = server
        .wait_log(STARTUP_TIMEOUT, |l| l.contains("listening (ws) on "))
        .expect("the server did not log `listening (ws) on ...`");
    let url = line.split_once("the chat page is ").map(|(_, u)| u.trim());
    let url = url.unwrap_or_else(|| panic!("no chat page URL in {line:?}"));
    (server, url.to_string())
}

/// A chromedriver on a free loopback port. Dropping it ends the browser sessions still open
/// (killing chromedriver alone would leave Chromium running), kills it by its PID and removes
/// the browser profiles.
struct Driver {
    child: Child,
    port: u16,
    /// Open sessions: WebDriver session id and the profile directory given to Chromium.
    sessions: RefCell<Vec<(String, PathBuf)>>,
}

impl Driver {
    fn start() -> Driver {
        for _ in 0..5 {
            let free = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
            let port = must(free, "a free port").port();
            let spawned = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "chromedriver is not on PATH: the browser tests need Chromium and its \
                     WebDriver (Debian: apt-get install chromium chromium-driver; .ci/run does it)"
                ),
                r => must(r, "running chromedriver"),
            };
            let sessions = RefCell::default();
            let mut d = Driver {
                child,
                port,
                sessions,
            };
            let deadline = Instant::now() + WAIT;
            while d.child.try_wait().ok().flatten().is_none() {
                let status = d.http("GET", "/status").unwrap_or_default();
                if status.replace(' ', "").contains("\"ready\":true") {
                    return d;
                }
                let late = Instant::now() >= deadline;
                assert!(!late, "chromedriver (port {port}) not ready in {WAIT:?}");
                std::thread::sleep(POLL);
            }
            // It exited: most likely someone took the port meanwhile. Another one.
        }
        panic!("chromedriver exited at start 5 times in a row");
    }

    /// One blocking HTTP request without a body to chromedriver; the response body.
    fn http(&self, method: &str, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n",
            self.port
        );
        s.write_all(format!("{head}Content-Length: 0\r\n\r\n").as_bytes())
            .ok()?;
        // chromedriver keeps the connection open: read the headers, then Content-Length bytes.
        let (mut r, mut head, mut len) = (BufReader::new(s), String::new(), 0);
        while r.read_line(&mut head).ok()? > 2 {
            let last = head.lines().last().unwrap_or_default().to_ascii_lowercase();
            if let Some(v) = last.strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        for (id, profile) in self.sessions.take() {
            // A session already closed is not found: harmless.
            let _ = self.http("DELETE", &format!("/session/{id}"));
            let _ = std::fs::remove_dir_all(profile);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One headless Chromium session with a fresh profile.
struct Browser {
    name: &'static str,
    c: Client,
}

/// The log's `div.line`s as `{cls, room, from, body}` (`span.from`, `span.body` textContent).
const LINES_JS: &str = "return [...document.querySelectorAll('#log div.line')].map(l => ({ \
    cls: l.className, room: l.dataset.room, body: l.querySelector('span.body').textContent, \
    from: (l.querySelector('span.from') || {}).textContent || '' }))";

/// How many elements in the log are neither a line nor one of its spans, or are an image.
const NOT_TEXT_JS: &str =
    "return document.querySelectorAll('#log img, #log :not(div.line, div.line > span)').length";

/// Whether a line from [`LINES_JS`] has `class`.
fn is(line: &Value, class: &str) -> bool {
    let classes = line["cls"].as_str().unwrap_or_default();
    classes.split(' ').any(|c| c == class)
}

impl Browser {
    async fn open(driver: &Driver, name: &'static str, phone: bool) -> Browser {
        let dir = format!("chromium-{}-{}-{name}", std::process::id(), driver.port);
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
        let _ = std::fs::remove_dir_all(&profile);
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
            &format!("--user-data-dir={}", profile.display()),
        ];
        let mut options = json!({ "args": args });
        if phone {
            let (width, height) = PHONE;
            let screen = json!({ "width": width, "height": height, "mobile": true });
            options["mobileEmulation"] = json!({ "deviceMetrics": screen });
        }
        let caps = json!({ "browserName": "chrome", "goog:chromeOptions": options });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let session = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await;
        let c = must(session, format_args!("{name}: starting Chromium"));
        let id = c.session_id().await.ok().flatten().expect("a session id");
        driver.sessions.borrow_mut().push((id, profile));
        let b = Browser { name, c };
        if !phone {
            // The window has a frame around the viewport: grow it by that much.
            let frame = "return [outerWidth - innerWidth, outerHeight - innerHeight]";
            let frame = b.js(frame).await;
            let extra = |i: usize| frame[i].as_u64().unwrap_or_default() as u32;
            let (w, h) = (DESKTOP.0 + extra(0), DESKTOP.1 + extra(1));
            b.ok(b.c.set_window_size(w, h).await, "resizing the window");
        }
        b
    }

    /// Ends the session, which closes Chromium.
    async fn close(self) {
        self.ok(self.c.clone().close().await, "closing the session");
    }

    /// The value, or a panic saying which browser failed at what.
    fn ok<T, E: Display>(&self, r: Result<T, E>, what: &str) -> T {
        must(r, format_args!("{}: {what}", self.name))
    }

    async fn js(&self, script: &str) -> Value {
        self.ok(self.c.execute(script, vec![]).await, script)
    }

    async fn click(&self, css: &str) {
        let found = self.ok(self.c.find(Locator::Css(css)).await, css);
        self.ok(found.click().await, css);
    }

    async fn type_into(&self, css: &str, text: &str) {
        let found = self.ok(self.c.find(Locator::Css(css)).await, css);
        self.ok(found.send_keys(text).await, css);
    }

    /// Types `text` in the composer and presses Enter.
    async fn say(&self, text: &str) {
        let typed = format!("{text}{}", Key::Enter);
        self.type_into("form#composer input#text", &typed).await;
    }

    /// Polls `script` until `ok` holds for its value (bounded); returns the value.
    async fn wait_js(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if ok(&v) {
                return v;
            }
            let late = Instant::now() >= deadline;
            assert!(!late, "{}: no {what} in {WAIT:?}; last: {v:#}", self.name);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (bounded) for a log line matching `pred`; returns it.
    async fn wait_line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let lines = |v: &Value| v.as_array().cloned().unwrap_or_default();
        let what = format!("log line {what}");
        let v = self
            .wait_js(&what, LINES_JS, |v| lines(v).iter().any(&pred))
            .await;
        lines(&v)
            .into_iter()
            .find(|l| pred(l))
            .expect("the line found")
    }

    async fn wait_presence(&self, room: &str, text: &str) {
        let pred = |l: &Value| is(l, "presence") && l["room"] == room && l["body"] == text;
        self.wait_line(&format!("{text:?} in {room}"), pred).await;
    }

    async fn wait_msg(&self, room: &str, from: &str, body: &str) -> Value {
        let what = format!("<{from}> {body:?} in {room}");
        let pred = |l: &Value| l["room"] == room && l["from"] == from && l["body"] == body;
        self.wait_line(&what, |l| is(l, "msg") && pred(l)).await
    }

    async fn login(&self, page: &str, nick: &str) {
        self.ok(self.c.goto(page).await, page);
        self.type_into("form#login input#nick", nick).await;
        self.click("form#login button#connect").await;
        let state = "return window.chatloop.state()";
        let connected = |v: &Value| v == "connected";
        self.wait_js("state 'connected'", state, connected).await;
        let shown = "return [document.querySelector('#app').hidden, \
            document.querySelector('#login').hidden, document.querySelector('#status').textContent]";
        let want = json!([false, true, format!("connected as {nick}")]);
        assert_eq!(self.js(shown).await, want, "{}: after login", self.name);
    }

    /// Waits until `room` is listed and is the current room.
    async fn wait_current(&self, room: &str) {
        let li = format!("#rooms li.current[data-room=\"{room}\"]");
        let js = format!("return !!document.querySelector('{li}')");
        self.wait_js(&li, &js, |v| v == true).await;
    }

    /// Waits until the member list is exactly `nicks` (in the page's order).
    async fn wait_members(&self, nicks: &[&str]) {
        let js = "return [...document.querySelectorAll('#members li[data-nick]')]\
            .map(li => li.dataset.nick)";
        let what = format!("members {nicks:?}");
        self.wait_js(&what, js, |v| v == &json!(nicks)).await;
    }

    /// Saves a screenshot of the viewport as `target/NAME`, and as `also` if given.
    async fn screenshot(&self, name: &str, also: Option<PathBuf>) {
        let png = self.ok(self.c.screenshot().await, "screenshot");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent();
        for path in [target.unwrap().join(name)].into_iter().chain(also) {
            must(std::fs::write(&path, &png), path.display());
            eprintln!("{}: screenshot saved to {}", self.name, path.display());
        }
    }
}

/// `chatloop-client` on plain TCP in scripted mode (piped stdin and stdout); killed on drop.
struct Cli {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<String>>>,
}

impl Cli {
    fn spawn(addr: SocketAddr, nick: &str, room: &str) -> Cli {
        let addr = addr.to_string();
        let mut child = Command::new(Exe::Client.path())
            .args(["--connect", &addr, "--nick", nick, "--join", room])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chatloop-client");
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[chatloop-client] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take().expect("piped");
        Cli { child, stdin, out }
    }

    fn send(&mut self, line: &str) {
        let written = writeln!(self.stdin, "{line}").and_then(|_| self.stdin.flush());
        must(written, "chatloop-client's stdin");
    }

    /// Waits (bounded) for an output line that is `want` after its `HH:MM:SS ` timestamp.
    async fn wait(&self, want: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.out.lock().unwrap().clone();
            let text = |l: &String| l.split_once(' ').map(|(_, t)| t == want);
            if out.iter().any(|l| text(l) == Some(true)) {
                return;
            }
            let late = Instant::now() >= deadline;
            assert!(!late, "chatloop-client: no {want:?} in {WAIT:?}: {out:#?}");
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn two_browsers_and_a_terminal_client_chat() {
    let (server, page) = start_server();
    Exe::Client.path(); // built (if needed) before the browsers start
    let driver = Driver::start();
    let alice = Browser::open(&driver, "alice", false).await;
    let bob = Browser::open(&driver, "bob", false).await;
    alice.login(&page, "alice").await;
    bob.login(&page, "bob").await;

    // Joining by `/join` (alice) and by the join form (bob); each sees the other arrive.
    alice.say("/join lobby").await;
    alice.wait_current("lobby").await;
    bob.type_into("form#joinform input#room", "lobby").await;
    bob.click("form#joinform button#join").await;
    bob.wait_current("lobby").await;
    alice.wait_presence("lobby", "* bob joined lobby").await;
    bob.say("/join random").await;
    bob.wait_current("random").await;
    alice.type_into("#room", "random").await;
    alice.click("#join").await;
    alice.wait_current("random").await;
    bob.wait_presence("random", "* alice joined random").await;

    // Text from the network is inserted as text: markup arrives literally, makes no element.
    let markup = "<b>bold</b><img src=x onerror=alert(1)>";
    alice.say(markup).await;
    bob.wait_msg("random", "alice", markup).await;
    alice.wait_msg("random", "alice", markup).await;
    for b in [&alice, &bob] {
        // The log holds lines of spans, nothing else: no <b>, no <img>.
        let n = b.js(NOT_TEXT_JS).await;
        assert_eq!(n, json!(0), "{}: elements made of network text", b.name);
    }
    bob.say("nice try :)").await;
    alice.wait_msg("random", "bob", "nice try :)").await;

    // Back to the lobby by clicking it in the room list.
    for b in [&alice, &bob] {
        b.click("#rooms li[data-room=lobby]").await;
        b.wait_current("lobby").await;
    }

    // carol, on plain TCP.
    let mut carol = Cli::spawn(server.addr(), "carol", "lobby");
    carol.wait("* carol joined lobby").await;
    alice.wait_presence("lobby", "* carol joined lobby").await;
    bob.wait_presence("lobby", "* carol joined lobby").await;

    // A conversation: each message is seen by the two others (and echoed to its sender).
    let said = [
        ("alice", "morning! the web client is up on the ws listener"),
        ("bob", "works here: two tabs, one room, presence and all"),
        ("carol", "hello from the terminal client, over TCP"),
        ("alice", "hi carol! same rooms, different transport"),
        ("carol", "nice. I'll keep my terminal, thanks"),
    ];
    for (from, text) in said {
        match from {
            "alice" => alice.say(text).await,
            "bob" => bob.say(text).await,
            _ => carol.send(text),
        }
        for b in [&alice, &bob] {
            let line = b.wait_msg("lobby", from, text).await;
            assert_eq!(is(&line, "mine"), b.name == from, "{}: {line}", b.name);
        }
        if from != "carol" {
            carol.wait(&format!("[lobby] <{from}> {text}")).await;
        }
    }

    // A whisper: shown to alice as one, and settled (no longer pending) on bob's side.
    let psst = "lunch after the release?";
    bob.say(&format!("/w alice {psst}")).await;
    let whisper = |l: &Value| is(l, "whisper") && l["from"].as_str().unwrap().starts_with("bob");
    let whisper = |l: &Value| whisper(l) && l["body"] == psst;
    alice.wait_line("bob's whisper", whisper).await;
    let settled = |l: &Value| is(l, "whisper") && !is(l, "pending") && l["body"] == psst;
    bob.wait_line("bob's settled whisper", settled).await;

    for b in [&alice, &bob] {
        b.wait_members(&["alice", "bob", "carol"]).await;
    }
    let docs = std::env::var("CHATLOOP_SAVE_SCREENSHOT").is_ok_and(|v| v == "1");
    let docs = docs.then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/web-chat.png"));
    alice.screenshot("browser-web-chat.png", docs).await;

    // carol quits: the browsers see her go.
    carol.send("/quit bye");
    for b in [&alice, &bob] {
        b.wait_presence("lobby", "* carol left lobby (quit)").await;
        b.wait_members(&["alice", "bob"]).await;
    }
    alice.close().await;
    bob.close().await;
}

/// Problems of the page on a phone of size (arguments[0], arguments[1]), as strings.
const PHONE_JS: &str = "const [w, h] = arguments, problems = []; \
    if (innerWidth !== w || innerHeight !== h) problems.push(`viewport ${innerWidth}x${innerHeight}`); \
    if (document.documentElement.scrollWidth > w) problems.push('the page scrolls sideways'); \
    for (const s of ['#log', 'form#composer', 'input#text', 'form#composer button']) { \
      const r = document.querySelector(s).getBoundingClientRect(); \
      if (r.left < 0 || r.top < 0 || r.right > w || r.bottom > h || r.width < 24 || r.height < 24) \
        problems.push(s + ' at ' + JSON.stringify(r)); } \
    const log = document.querySelector('#log').getBoundingClientRect().height; \
    if (log < h / 3) problems.push(`the log is ${log}px high`); \
    return problems;";

#[tokio::test]
async fn phone_sized_window_is_usable() {
    let (_server, page) = start_server();
    let driver = Driver::start();
    let eve = Browser::open(&driver, "eve", true).await;
    eve.login(&page, "eve").await;
    eve.say("/join lobby").await;
    eve.wait_current("lobby").await;
    eve.say("hello from a phone").await;
    eve.wait_msg("lobby", "eve", "hello from a phone").await;

    // The viewport is the phone's; the log and the composer are within it, big enough to use.
    let problems = eve
        .c
        .execute(PHONE_JS, vec![json!(PHONE.0), json!(PHONE.1)]);
    let problems = eve.ok(problems.await, "measuring the page");
    assert_eq!(problems, json!([]), "the page on a phone");
    eve.screenshot("browser-web-chat-phone.png", None).await;

    // The member list is behind the ☰ button on a narrow screen.
    eve.click("button#toggle").await;
    let me = "return document.querySelector('#members li[data-nick=eve]').getBoundingClientRect()";
    let open = |r: &Value| r["height"].as_f64() > Some(0.0) && r["right"].as_u64() <= Some(375);
    eve.wait_js("eve in the opened member list", me, open).await;
    eve.close().await;
}

/// One connection through a [`Relay`]: the browser's socket and the relay's own to the server.
struct Relayed {
    browser: TcpStream,
    server: TcpStream,
}

type Conns = Arc<Mutex<Vec<Relayed>>>;

/// A plain TCP relay on 127.0.0.1 in front of `target`: each accepted connection gets its own
/// connection to `target` and two threads pumping bytes, one each way. What the browser sends
/// goes to the server until the browser side ends, which is NOT passed on (cutting the browser
/// side leaves the server's connection open); the server's end (EOF) is passed on to the browser.
/// The WebSocket connections (those that begin with `GET /chat`) are kept, in order, so a test
/// can cut them. While paused ([`Relay::pause`]), a new connection waits before it is connected
/// to `target`, so a test can act while the browser's reconnect cannot reach the server.
/// Dropping the relay stops accepting and shuts every socket down, which ends the pumping threads.
struct Relay {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    all: Conns,
    ws: Conns,
    accepting: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = must(TcpListener::bind("127.0.0.1:0"), "binding the relay");
        let addr = must(listener.local_addr(), "the relay's address");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (all, ws): (Conns, Conns) = Default::default();
        let (stopped, all2, ws2) = (Arc::clone(&stop), Arc::clone(&all), Arc::clone(&ws));
        let held = Arc::clone(&paused);
        let accepting = std::thread::spawn(move || {
            let on = |flag: &std::sync::atomic::AtomicBool| {
                flag.load(std::sync::atomic::Ordering::SeqCst)
            };
            for browser in listener.incoming() {
                // Paused: the connection waits (the browser sees a slow server, not an error).
                while on(&held) && !on(&stopped) {
                    std::thread::sleep(POLL);
                }
                if on(&stopped) {
                    return;
                }
                let Ok(browser) = browser else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let pair = |b: &TcpStream, s: &TcpStream| {
                    let browser = must(b.try_clone(), "cloning a relayed socket");
                    let server = must(s.try_clone(), "cloning a relayed socket");
                    Relayed { browser, server }
                };
                all2.lock().unwrap().push(pair(&browser, &server));
                let (up_from, up_to) = (pair(&browser, &server), Arc::clone(&ws2));
                let this = pair(&browser, &server);
                std::thread::spawn(move || {
                    // Browser to server; the first bytes tell whether it is the WebSocket.
                    let Relayed { browser, server } = up_from;
                    pump(&browser, &server, |first| {
                        if first.starts_with(b"GET /chat ") {
                            up_to.lock().unwrap().push(this);
                        }
                    });
                });
                std::thread::spawn(move || {
                    pump(&server, &browser, |_| {});
                    // The server ended this connection: so does the relay, toward the browser.
                    let _ = browser.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay {
            addr,
            stop,
            paused,
            all,
            ws,
            accepting: Some(accepting),
        }
    }

    /// The URL of the chat page through the relay.
    fn page(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// While `on`, new connections wait before they are connected to the server.
    fn pause(&self, on: bool) {
        self.paused.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many WebSocket connections went through the relay so far.
    fn ws_count(&self) -> usize {
        self.ws.lock().unwrap().len()
    }

    /// Waits (bounded) until `n` WebSocket connections went through the relay.
    async fn wait_ws(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.ws_count() < n {
            let late = Instant::now() >= deadline;
            assert!(
                !late,
                "relay: {n} WebSocket connections awaited in {WAIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Shuts down the browser side of the latest WebSocket connection and, if `server_too`,
    /// the server side as well.
    fn cut_latest_ws(&self, server_too: bool) {
        let ws = self.ws.lock().unwrap();
        let last = ws.last().expect("a WebSocket connection through the relay");
        must(
            last.browser.shutdown(std::net::Shutdown::Both),
            "cut (browser)",
        );
        if server_too {
            must(
                last.server.shutdown(std::net::Shutdown::Both),
                "cut (server)",
            );
        }
    }
}

/// Copies `from` to `to` until `from` ends or `to` fails; `first` sees the first bytes read.
fn pump(mut from: &TcpStream, mut to: &TcpStream, first: impl FnOnce(&[u8])) {
    let mut buf = vec![0; 64 * 1024];
    let mut first = Some(first);
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if let Some(f) = first.take() {
            f(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
        for c in self.all.lock().unwrap().drain(..) {
            let _ = c.browser.shutdown(std::net::Shutdown::Both);
            let _ = c.server.shutdown(std::net::Shutdown::Both);
        }
        self.ws.lock().unwrap().clear();
    }
}

/// The server's address in a chat page URL `http://IP:PORT/`.
fn page_addr(page: &str) -> SocketAddr {
    let host = page.trim_start_matches("http://").trim_end_matches('/');
    must(host.parse(), format_args!("the address in {page:?}"))
}

/// A PRESENCE saying that `nick` left `room` other than by LEAVE (quit or gone), if `f` is one.
fn went_away(f: &common::Frame, room: &str, nick: &str) -> Option<u8> {
    if f.op != common::sop::PRESENCE {
        return None;
    }
    let p = f.presence();
    let away = [common::kind::QUIT, common::kind::GONE].contains(&p.kind);
    (away && p.room == room && p.nick == nick).then_some(p.kind)
}

#[tokio::test]
async fn a_dropped_connection_reconnects_and_says_what_happened() {
    let (server, page) = start_server();
    let relay = Relay::start(page_addr(&page));
    let driver = Driver::start();
    let alice = Browser::open(&driver, "alice", false).await;

    // 1. alice, through the relay, in the lobby; bob, on plain TCP, there too.
    alice.login(&relay.page(), "alice").await;
    alice.say("/join lobby").await;
    alice.wait_presence("lobby", "* alice joined lobby").await;
    let mut bob = common::Client::connect(server.addr());
    bob.set_timeout(WAIT);
    bob.hello("bob");
    bob.join("lobby");
    alice.wait_presence("lobby", "* bob joined lobby").await;
    relay.wait_ws(1).await;
    assert_eq!(
        relay.ws_count(),
        1,
        "WebSocket connections before the first cut"
    );

    // 2. Only the browser's side is cut: the server still holds alice's session, and the page
    // resumes it on a new connection; nobody sees alice go.
    relay.cut_latest_ws(false);
    let resumed = |l: &Value| is(l, "system") && l["body"] == "* session resumed";
    alice.wait_line("'* session resumed'", resumed).await;
    // The server keeps no history (--history 0), and nothing was said meanwhile.
    let nothing =
        |l: &Value| is(l, "system") && l["room"] == "lobby" && l["body"] == "* nothing missed";
    alice.wait_line("'* nothing missed'", nothing).await;
    assert_eq!(
        relay.ws_count(),
        2,
        "WebSocket connections after the resume"
    );
    let expired = "return [...document.querySelectorAll('#log div.line span.body')]\
        .filter(b => b.textContent.includes('previous session expired')).length";
    assert_eq!(
        alice.js(expired).await,
        json!(0),
        "alice: 'expired' after a resume"
    );
    let text = "still there, alice?";
    bob.send_say("lobby", text);
    let echo = |f: &common::Frame| f.op == common::sop::MESSAGE && f.message().text == text;
    let (mut seen, _) = bob.recv_until(echo);
    alice.wait_msg("lobby", "bob", text).await;
    seen.extend(bob.barrier());
    let gone = seen.iter().filter_map(|f| went_away(f, "lobby", "alice"));
    assert_eq!(gone.count(), 0, "bob saw alice leave on a resume: {seen:?}");

    // 3. Both sides cut: the server ends alice's session (PRESENCE gone, 8.6); the page's
    // token is unknown by then, so it gets a new session and joins the lobby again.
    relay.cut_latest_ws(true);
    let (_, left) = bob.recv_until(|f| went_away(f, "lobby", "alice").is_some());
    assert_eq!(left.presence().kind, common::kind::GONE, "{left:?}");
    let joined = |f: &common::Frame| {
        f.op == common::sop::PRESENCE
            && f.presence()
                == common::Presence {
                    kind: common::kind::JOIN,
                    room: "lobby".into(),
                    nick: "alice".into(),
                }
    };
    bob.recv_until(joined);
    let note = "* previous session expired; rejoined lobby — messages sent meanwhile were missed";
    let rejoined = |l: &Value| is(l, "system") && l["body"] == note;
    alice
        .wait_line("'* previous session expired …'", rejoined)
        .await;
    assert_eq!(
        relay.ws_count(),
        3,
        "WebSocket connections after the rejoin"
    );
    alice.close().await;
}

/// Holds back the HISTORY frames (opcode 0x0A) the page sends, in `window.heldHistory`, until
/// `window.releaseHistory()` sends them (in order) and stops holding.
const HOLD_HISTORY_JS: &str = "const send = WebSocket.prototype.send; \
    window.heldHistory = []; \
    WebSocket.prototype.send = function (b) { \
      if (window.heldHistory && b instanceof Uint8Array && b[3] === 0x0A) \
        return void window.heldHistory.push([this, b]); \
      return send.call(this, b); }; \
    window.releaseHistory = () => { const held = window.heldHistory; window.heldHistory = null; \
      for (const [ws, b] of held) send.call(ws, b); return held.length; };";

/// bob (TCP) says `text` in the lobby; every frame he receives until its echo goes to `seen`.
fn say_tcp(bob: &mut common::Client, seen: &mut Vec<common::Frame>, text: &str) {
    bob.send_say("lobby", text);
    let echo = |f: &common::Frame| f.op == common::sop::MESSAGE && f.message().text == text;
    let (before, echo) = bob.recv_until(echo);
    seen.extend(before);
    seen.push(echo);
}

/// The lines of `room` from [`LINES_JS`], each as `KIND [FROM: ]BODY`, KIND being the first of
/// `recovered`, `history`, `msg`, `whisper`, `system`, `presence` or `error` it has.
fn room_lines(lines: &Value, room: &str) -> Vec<String> {
    let kinds = [
        "recovered",
        "history",
        "msg",
        "whisper",
        "system",
        "presence",
        "error",
    ];
    let lines = lines.as_array().cloned().unwrap_or_default();
    let in_room = lines.into_iter().filter(|l| l["room"] == room);
    let show = |l: Value| {
        let kind = kinds.into_iter().find(|k| is(&l, k)).unwrap_or("?");
        let (from, body) = (l["from"].as_str().unwrap(), l["body"].as_str().unwrap());
        match from {
            "" => format!("{kind} {body}"),
            _ => format!("{kind} {from}: {body}"),
        }
    };
    in_room.map(show).collect()
}

#[tokio::test]
async fn messages_missed_while_away_are_recovered_in_order() {
    let flags = ["--resume-window", "30s", "--history", "100"];
    let (server, page) = start_server_with(&[&flags[..], &["--metrics", "127.0.0.1:0"]].concat());
    let relay = Relay::start(page_addr(&page));
    let driver = Driver::start();
    let alice = Browser::open(&driver, "alice", false).await;

    // 1. alice, through the relay, in the lobby; bob, on plain TCP, there too. What bob says
    // before the cut reaches alice live.
    alice.login(&relay.page(), "alice").await;
    alice.say("/join lobby").await;
    alice.wait_presence("lobby", "* alice joined lobby").await;
    let mut bob = common::Client::connect(server.addr());
    bob.set_timeout(WAIT);
    bob.hello("bob");
    bob.join("lobby");
    alice.wait_presence("lobby", "* bob joined lobby").await;
    let mut seen = Vec::new(); // every frame bob receives from now on
    say_tcp(&mut bob, &mut seen, "before the cut");
    alice.wait_msg("lobby", "bob", "before the cut").await;
    relay.wait_ws(1).await;

    // 2. The relay cuts both sides of the page's WebSocket and holds its reconnect back: the
    // server sees the loss and holds alice's session (no PRESENCE for anyone). Meanwhile bob
    // says three things in the lobby and whispers to alice.
    relay.pause(true);
    relay.cut_latest_ws(true);
    let held = |m: &common::Metrics| m.get("chatloop_sessions_held") == 1;
    server.wait_metrics("alice's session held", WAIT, held);
    let missed = [
        "first, while you were away",
        "second <b>not bold</b>",
        "third and last",
    ];
    for text in missed {
        say_tcp(&mut bob, &mut seen, text);
    }
    let psst = "psst: whispered while you were away";
    bob.whisper("alice", psst);
    seen.extend(bob.barrier());
    let errors = seen.iter().filter(|f| f.op == common::sop::ERROR);
    assert_eq!(errors.count(), 0, "bob got an ERROR: {seen:?}");
    assert_eq!(relay.ws_count(), 1, "the page got through the paused relay");

    // 3. The page reconnects by itself, resumes the session (its JOIN: already_in_room) and
    // asks what it missed. Its HISTORY requests are held back in the page until bob has said
    // something more: that arrives live before the answer, and must be shown after it.
    alice.js(HOLD_HISTORY_JS).await;
    relay.pause(false);
    let held = "return window.heldHistory.length";
    alice
        .wait_js("HISTORY (lobby, whispers) held", held, |v| v == 2)
        .await;
    say_tcp(&mut bob, &mut seen, "said during the recovery");
    alice.js("return window.releaseHistory()").await;
    let recovered = |l: &Value| {
        is(l, "system") && l["room"] == "lobby" && l["body"] == "* recovered 3 messages"
    };
    alice.wait_line("'* recovered 3 messages'", recovered).await;
    let whisper = |l: &Value| is(l, "whisper") && is(l, "recovered") && l["body"] == psst;
    let whisper = alice.wait_line("bob's recovered whisper", whisper).await;
    assert_eq!(whisper["from"], "bob → you", "{whisper}");
    let note = |l: &Value| is(l, "system") && l["body"] == "* recovered 1 whisper";
    alice.wait_line("'* recovered 1 whisper'", note).await;
    let resumed = |l: &Value| is(l, "system") && l["body"] == "* session resumed";
    alice.wait_line("'* session resumed'", resumed).await;
    assert_eq!(
        relay.ws_count(),
        2,
        "WebSocket connections after the resume"
    );

    // 4. What bob says now comes after the recovered messages, as a live message.
    say_tcp(&mut bob, &mut seen, "welcome back");
    alice.wait_msg("lobby", "bob", "welcome back").await;
    let lines = room_lines(&alice.js(LINES_JS).await, "lobby");
    let want = [
        "presence * alice joined lobby",
        "presence * bob joined lobby",
        "msg bob: before the cut",
        "recovered bob: first, while you were away",
        "recovered bob: second <b>not bold</b>",
        "recovered bob: third and last",
        "system * recovered 3 messages",
        "msg bob: said during the recovery",
        "msg bob: welcome back",
    ];
    assert_eq!(lines, want, "alice: the lobby's lines");
    let n = alice.js(NOT_TEXT_JS).await;
    assert_eq!(n, json!(0), "alice: elements made of network text");

    // Nobody saw alice go or come back; the server resumed the held session.
    seen.extend(bob.barrier());
    let presence =
        |f: &&common::Frame| f.op == common::sop::PRESENCE && f.presence().nick == "alice";
    let presence: Vec<_> = seen.iter().filter(presence).collect();
    assert!(
        presence.is_empty(),
        "bob saw alice's presence: {presence:?}"
    );
    let resumed = |m: &common::Metrics| {
        m.get("chatloop_sessions_held") == 0 && m.get("chatloop_sessions_held_resumed_total") == 1
    };
    server.wait_metrics("alice's held session resumed", WAIT, resumed);
    alice
        .screenshot("browser-web-chat-recovered.png", None)
        .await;

    // 5. Scrollback: joining a room shows what was said there before, above the JOIN's line.
    bob.join("random");
    for text in ["said before alice came", "and this too"] {
        bob.send_say("random", text);
    }
    bob.barrier();
    alice.say("/join random").await;
    alice.wait_current("random").await;
    bob.recv_until(|f| f.op == common::sop::PRESENCE && f.presence().nick == "alice");
    bob.send_say("random", "hello alice");
    alice.wait_msg("random", "bob", "hello alice").await;
    let lines = room_lines(&alice.js(LINES_JS).await, "random");
    let want = [
        "history bob: said before alice came",
        "history bob: and this too",
        "presence * alice joined random",
        "msg bob: hello alice",
    ];
    assert_eq!(lines, want, "alice: the lines of random");
    alice.close().await;
}
