//! The real llama.cpp server (llama.cpp's own server code via the `xllamacpp` wheel),
//! set up by `scripts/realbackend/setup.sh`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to load the model.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running real backend. Killed on drop; it also exits if this process dies.
pub struct RealBackend {
    child: Child,
    url: String,
    /// The model id it serves.
    pub model: String,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("POTLUCK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/potluck")
        })
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl RealBackend {
    /// Start the real SmolLM2-135M-Instruct server with embeddings on, on a free port,
    /// with the repository's tool-capable chat template
    /// (`scripts/realbackend/smollm2-tools.jinja`: SmolLM2's own template says it has no
    /// tools, so llama.cpp would report `supports_tools: false`).
    pub fn smollm2() -> Self {
        let model = cache_dir().join("realbackend/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let template = repo_root().join("scripts/realbackend/smollm2-tools.jinja");
        Self::start_with(model, "smollm2-135m-instruct", true, Some(template))
    }

    /// Start a server for a GGUF file, with its own chat template.
    pub fn start(model_path: PathBuf, alias: &str, embeddings: bool) -> Self {
        Self::start_with(model_path, alias, embeddings, None)
    }

    /// Start a server for a GGUF file, with a chat template file instead of its own.
    pub fn start_with(
        model_path: PathBuf,
        alias: &str,
        embeddings: bool,
        chat_template: Option<PathBuf>,
    ) -> Self {
        let python = cache_dir().join("realbackend/venv/bin/python");
        assert!(
            python.exists() && model_path.exists(),
            "the real backend is not set up: run scripts/realbackend/setup.sh (looked for {} and {})",
            python.display(),
            model_path.display()
        );
        let mut cmd = Command::new(python);
        cmd.arg("-u")
            .arg(repo_root().join("scripts/realbackend/serve_xllamacpp.py"))
            .arg(&model_path)
            .arg("0")
            .args([
                "--threads",
                "1",
                "--parallel",
                "4",
                "--ctx",
                "4096",
                "--alias",
                alias,
                "--exit-with-parent",
            ]);
        if embeddings {
            cmd.args(["--embeddings", "--pooling", "mean"]);
        }
        if let Some(t) = chat_template {
            cmd.arg("--chat-template-file").arg(t);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn real backend");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("xllamacpp listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(START_TIMEOUT)
            .expect("real backend did not start");
        let deadline = Instant::now() + START_TIMEOUT;
        // Wait for /health (model loaded).
        loop {
            let ok = std::net::TcpStream::connect(url.trim_start_matches("http://"))
                .ok()
                .and_then(|mut s| {
                    use std::io::{Read, Write};
                    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
                    let mut buf = String::new();
                    s.read_to_string(&mut buf).ok()?;
                    Some(buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200"))
                })
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "real backend never became healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url,
            model: alias.to_owned(),
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.url)
    }
}

impl Drop for RealBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
