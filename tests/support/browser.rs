//! The dashboard (`kubectl llmproxy dashboard`, a real process) and a real browser to
//! use it: headless Chromium from Debian's packages, driven over WebDriver (chromedriver,
//! from the same packages) with fantoccini.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

use super::{Env, eventually, free_port, kubeconfig, repo};

/// A running `kubectl llmproxy dashboard`, acting as a kubeconfig's user.
pub struct Dashboard {
    /// The sign-in address it printed (with its one-time code).
    pub login_url: String,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub port: u16,
    /// Its stderr: one line per request.
    pub log: PathBuf,
    child: Child,
}

impl Dashboard {
    /// Starts the dashboard for `env`'s operator namespace on a free port, as a user would:
    /// `kubectl llmproxy dashboard`, then the address it prints.
    pub fn start(env: &Env) -> Self {
        Self::start_as(env, "dashboard", &kubeconfig())
    }

    /// Like [`Dashboard::start`], as the user of `kubeconfig`; its log is `role`'s.
    pub fn start_as(env: &Env, role: &str, kubeconfig: &Path) -> Self {
        let log = env.log_path(role);
        // Through kubectl's plugin discovery, as a person starts it (kubectl execs the plugin).
        let plugin = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-llmproxy"));
        let path = format!("{}:{}", plugin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new(super::kubectl())
            .args(["llmproxy", "dashboard", "--operator-namespace", &env.ops])
            .env("KUBECONFIG", kubeconfig)
            .env("PATH", path)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting kubectl-llmproxy dashboard");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let login_url = line.trim().to_string();
        assert!(
            login_url.starts_with("http://127.0.0.1:"),
            "the dashboard printed {line:?}; its log: {}",
            log.display()
        );
        let base = login_url.split("/login").next().unwrap().to_string();
        let port = base.rsplit(':').next().unwrap().parse().unwrap();
        Self { login_url, base, port, log, child }
    }

    /// Everything it has logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless Chromium under chromedriver, one window of 1280×900.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

/// Chromium itself (Debian's `/usr/bin/chromium` is a wrapper script).
fn chromium() -> &'static str {
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("Chromium is not installed: run hack/setup.sh (apt-get install chromium chromium-driver)")
}

impl Browser {
    /// Starts chromedriver and a fresh browser profile.
    pub async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run hack/setup.sh (apt-get install chromium-driver)");
        let profile = std::env::temp_dir().join(format!("llmproxy-chromium-{port}"));
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else { unreachable!() };
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually(Duration::from_secs(20), || async {
            ClientBuilder::new(HttpConnector::new()).capabilities(capabilities.clone()).connect(&url).await.ok()
        })
        .await;
        Self { client, driver, profile }
    }

    /// Opens `url` and waits for it to load.
    pub async fn go(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// The address of the page shown.
    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// The text of the page, as a person reads it.
    pub async fn text(&self) -> String {
        self.client.find(Locator::Css("body")).await.unwrap().text().await.unwrap()
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    /// The text of the element `css`.
    pub async fn text_of(&self, css: &str) -> String {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
        element.text().await.unwrap()
    }

    /// Clicks the button or link whose text is `label` (the first, in page order) and
    /// waits for the page it leads to (every button and link of the dashboard leads to one).
    pub async fn click(&self, label: &str) {
        let xpath = format!("//button[normalize-space()='{label}'] | //a[normalize-space()='{label}']");
        let element = self.client.find(Locator::XPath(&xpath)).await.unwrap_or_else(|e| panic!("no {label:?}: {e}"));
        let page = self.client.find(Locator::Css("html")).await.unwrap();
        element.click().await.unwrap_or_else(|e| panic!("clicking {label:?}: {e}"));
        // The old page's root goes stale once the new page has replaced it.
        eventually(super::WAIT, || async {
            let gone = page.tag_name().await.is_err();
            let loaded = self.client.execute("return document.readyState", vec![]).await.ok()? == "complete";
            (gone && loaded).then_some(())
        })
        .await;
    }

    /// Types `value` into the field `css` (emptied first).
    pub async fn fill(&self, css: &str, value: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no field {css}: {e}"));
        element.clear().await.unwrap();
        element.send_keys(value).await.unwrap();
    }

    /// Chooses the option `value` of the select `css`.
    pub async fn choose(&self, css: &str, value: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no select {css}: {e}"));
        element.select_by_value(value).await.unwrap();
    }

    /// Reloads the page (a GET) until the text of its element `css` contains `needle`;
    /// that text.
    pub async fn wait_for(&self, css: &str, needle: &str) -> String {
        eventually(super::WAIT, || async {
            self.client.refresh().await.ok()?;
            let text = self.client.find(Locator::Css(css)).await.ok()?.text().await.ok()?;
            text.contains(needle).then_some(text)
        })
        .await
    }

    /// Saves the whole page as `target/dashboard-screenshots/<name>.png`, and with
    /// `LLMPROXY_SCREENSHOTS=docs` also as `docs/dashboard/<name>.png` (`just screenshots`).
    pub async fn screenshot(&self, name: &str) {
        // The whole page: the window grows to the document's height (plus what the
        // window's frame takes) for the picture.
        let script = "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight";
        let height = self.client.execute(script, vec![]).await.unwrap();
        let height = height.as_u64().unwrap_or(900).clamp(600, 4000) as u32;
        self.client.set_window_size(1280, height).await.unwrap();
        let png = self.client.screenshot().await.unwrap();
        self.client.set_window_size(1280, 900).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        let mut folders = vec![repo().join("target/dashboard-screenshots")];
        if std::env::var("LLMPROXY_SCREENSHOTS").is_ok_and(|v| v == "docs") {
            folders.push(repo().join("docs/dashboard"));
        }
        for folder in folders {
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium outlives a killed chromedriver: end it by its profile, then the driver.
        // `--` first: the pattern starts with dashes, and pkill would take it for an
        // option, refuse it and leave every test's browser running.
        let pattern = format!("--user-data-dir={}", self.profile.display());
        let _ = Command::new("pkill").args(["-f", "--", &pattern]).status();
        // It takes a moment to exit, writing to its profile until then.
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10)
            && Command::new("pgrep")
                .args(["-f", "--", &pattern])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
