//! The man page (`layerfs.1`) and shell completions, generated from the
//! clap definitions in `cli.rs`, so that they list exactly the commands,
//! flags and `-o` options that `--help` does. `man/layerfs.1` in the
//! repository is this output, committed (`scripts/gen-docs.sh` rewrites
//! it; a test fails when it lacks a command, flag or `-o` option).
//!
//! The page is one file: the mount forms and every `-o` option (parsed
//! from the top-level help text, whose table is written as `  TERM  TEXT`
//! lines with indented continuations), the top-level flags, one subsection
//! per visible subcommand with its options (rendered by `clap_mangen`),
//! then the hand-written sections below (fstab, exit status, files).

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::cli::{Cli, Generate, GenerateArgs};

/// `layerfs generate man|completions SHELL`: to stdout.
pub fn generate_cmd(g: GenerateArgs) -> Result<(), String> {
    use std::io::Write;
    let bytes = match g.what {
        Generate::Man => man_page(),
        Generate::Completions { shell } => completions(shell),
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| format!("generate: {e}")),
    }
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "layerfs", &mut out);
    out
}

/// The whole man page, roff.
pub fn man_page() -> Vec<u8> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd.clone())
        .title("LAYERFS")
        .manual("User Commands")
        .source(format!("layerfs {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    let _ = man.render_title(&mut out);
    let long = cmd
        .get_long_about()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let blocks = Block::parse(&long);
    let mut roff = Roff::new();
    name(&mut roff, &cmd);
    synopsis(&mut roff, &cmd, &blocks);
    description(&mut roff, &blocks);
    out.extend_from_slice(roff.render().as_bytes());
    // The top-level flags (-o, -f, -d, --help, --version, MOUNTPOINT).
    let _ = man.render_options_section(&mut out);
    out.extend_from_slice(commands(&cmd).as_bytes());
    out.extend_from_slice(EXTRA.as_bytes());
    out
}

/// A paragraph of the top-level help: prose, or a `Heading:` with a table
/// of `  TERM  TEXT` rows.
#[derive(Debug, PartialEq)]
enum Block {
    Text(String),
    Table {
        heading: String,
        rows: Vec<(String, String)>,
    },
}

impl Block {
    fn parse(text: &str) -> Vec<Block> {
        let mut blocks: Vec<Block> = Vec::new();
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let body = line.trim();
            let last = blocks.last_mut();
            match (indent, last) {
                (_, _) if body.is_empty() => blocks.push(Block::Text(String::new())),
                (0, _) if body.ends_with(':') => blocks.push(Block::Table {
                    heading: body.trim_end_matches(':').to_string(),
                    rows: Vec::new(),
                }),
                (1..=3, Some(Block::Table { rows, .. })) => {
                    let (term, text) = match body.find("  ") {
                        Some(i) => (&body[..i], body[i..].trim()),
                        None => (body, ""),
                    };
                    rows.push((term.to_string(), text.to_string()));
                }
                (4.., Some(Block::Table { rows, .. })) if !rows.is_empty() => {
                    let text = &mut rows.last_mut().expect("a row").1;
                    text.push(' ');
                    text.push_str(body);
                }
                (_, Some(Block::Text(t))) => {
                    if !t.is_empty() {
                        t.push(' ');
                    }
                    t.push_str(body);
                }
                _ => blocks.push(Block::Text(body.to_string())),
            }
        }
        blocks.retain(|b| !matches!(b, Block::Text(t) if t.is_empty()));
        blocks
    }
}

/// `layerfs - WHAT`, from the one-line about without its `layerfs: `.
fn name(roff: &mut Roff, cmd: &clap::Command) {
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    let about = about
        .trim_start_matches("layerfs:")
        .trim()
        .trim_end_matches('.');
    roff.control("SH", ["NAME"]);
    roff.text([roman(format!("layerfs - {about}"))]);
}

fn synopsis(roff: &mut Roff, cmd: &clap::Command, blocks: &[Block]) {
    roff.control("SH", ["SYNOPSIS"]);
    let forms = blocks.iter().find_map(|b| match b {
        Block::Table { heading, rows } if heading.starts_with("Mount forms") => Some(rows),
        _ => None,
    });
    for (form, _) in forms.into_iter().flatten() {
        roff.text([bold(form.as_str())]);
        roff.control("br", []);
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        roff.text([bold(usage(sub))]);
        roff.control("br", []);
    }
}

/// `layerfs diff [OPTIONS] ...`, from clap's usage line.
fn usage(sub: &clap::Command) -> String {
    let u = sub.clone().render_usage().to_string();
    u.trim_start_matches("Usage:").trim().to_string()
}

fn description(roff: &mut Roff, blocks: &[Block]) {
    roff.control("SH", ["DESCRIPTION"]);
    roff.text([roman(
        "layerfs mounts a union of directories with FUSE, in the on-disk format of the kernel's \
         overlayfs: lower layers are read-only, changes go to the upper layer (copy-up, whiteouts, \
         opaque directories), and an upper written by layerfs can be mounted by the kernel and the \
         other way round. It takes the command line of fuse-overlayfs, so container engines \
         (podman's mount_program, docker's fuse-overlayfs driver) can use it, and the one \
         mount.fuse3 uses, so it can be mounted with mount -t fuse.layerfs and from /etc/fstab.",
    )]);
    for b in blocks {
        match b {
            Block::Text(t) if t.starts_with("layerfs:") => {}
            Block::Text(t) => {
                roff.control("PP", []);
                roff.text([roman(t.as_str())]);
            }
            Block::Table { heading, .. } if heading.starts_with("Mount forms") => {}
            Block::Table { heading, rows } => {
                let title = if heading.contains("-o") {
                    "MOUNT OPTIONS".to_string()
                } else {
                    heading.to_uppercase()
                };
                roff.control("SH", [title.as_str()]);
                for (term, text) in rows {
                    roff.control("TP", []);
                    roff.text([bold(term.as_str())]);
                    roff.text([roman(text.as_str())]);
                }
            }
        }
    }
}

/// One `.SS` per visible subcommand: usage, description, options.
fn commands(cmd: &clap::Command) -> String {
    let mut s = Roff::new();
    s.control("SH", ["COMMANDS"]);
    let mut out = s.render();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut r = Roff::new();
        r.control("SS", [format!("layerfs {}", sub.get_name()).as_str()]);
        r.text([italic("Usage: "), bold(usage(sub))]);
        let about = sub
            .get_long_about()
            .or_else(|| sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        for para in about.split("\n\n") {
            r.control("PP", []);
            r.text([roman(para.replace('\n', " "))]);
        }
        out.push_str(&r.render());
        let mut opts = Vec::new();
        let _ = Man::new(sub.clone()).render_options_section(&mut opts);
        let opts = String::from_utf8_lossy(&opts);
        // Options as an indented list under the subsection, not a new section.
        out.push_str(&opts.replace(".SH OPTIONS\n", ".PP\nOptions:\n"));
    }
    out
}

/// The hand-written sections.
const EXTRA: &str = r#".SH FSTAB
mount(8) mounts a filesystem of type \fBfuse.layerfs\fR through
mount.fuse3(8), which runs \fBlayerfs\fR \fISOURCE\fR \fIMOUNTPOINT\fR
\fB\-o\fR \fIOPTIONS\fR through /bin/sh. mount(8) does not pass PATH on,
so layerfs must be in a directory of the shell's default PATH, such as
/usr/local/bin or /usr/bin. The layers are given in the options; SOURCE is not used (findmnt
shows \fBlayerfs\fR), so any word will do but a layerfs command name
(mount, run, ...); here it repeats the lower layers. mount.fuse3 adds \fBdev,suid\fR to the options (the kernel
overlay's defaults as well). An /etc/fstab line:
.PP
.nf
.RS
/layers/a:/layers/b  /mnt/merged  fuse.layerfs  lowerdir=/layers/a:/layers/b,upperdir=/layers/upper,workdir=/layers/work,allow_other  0  0
.RE
.fi
.PP
then \fBmount /mnt/merged\fR, and \fBumount /mnt/merged\fR. The same by
hand:
.PP
.nf
.RS
mount \-t fuse.layerfs \-o lowerdir=/layers/a:/layers/b,upperdir=/layers/upper,workdir=/layers/work /layers/a:/layers/b /mnt/merged
.RE
.fi
.PP
Add \fBnoauto\fR to keep it from being mounted at boot, \fBro\fR (and leave
out upperdir and workdir) for a read-only union, \fBnofail\fR if the
layers may be missing. A ':' in a layer path is written '\e:'.
.SH EXIT STATUS
0 on success; 1 on failure (a mount that could not be made, a layer that
could not be read), with one line on stderr saying why. \fBlayerfs run\fR
exits with the command's status. \fBlayerfs check\fR exits 0 when it finds
nothing, 1 when it reports findings, 2 on an error. Usage errors exit 2.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log level of the daemon (error, warn, info, debug); \fB\-d\fR sets debug.
.SH FILES
.TP
\fI/run/layerfs/\fR
One record per running mount (its layers), for \fBlayerfs diff MOUNTPOINT\fR;
\fI$XDG_RUNTIME_DIR/layerfs/\fR when not run as root.
.SH NOTES
Unmount with \fBumount\fR or \fBfusermount3 \-u\fR; the daemon then exits,
having flushed everything. Layers must not be changed while they are
mounted (the same rule as the kernel's overlayfs). Shell completions:
\fBlayerfs generate completions bash|zsh|fish\fR.
.SH SEE ALSO
mount(8), mount.fuse3(8), fusermount3(1), fstab(5), fuse-overlayfs(1),
and the kernel's Documentation/filesystems/overlayfs.rst.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_help_tables() {
        let text = "layerfs: a thing.\n\nForms:\n  a b   first\n  c\n\nOptions in -o:\n  x=1   one\n                more\n  y     two\nPlain text\nand more.\n";
        let b = Block::parse(text);
        assert_eq!(
            b,
            vec![
                Block::Text("layerfs: a thing.".into()),
                Block::Table {
                    heading: "Forms".into(),
                    rows: vec![("a b".into(), "first".into()), ("c".into(), "".into())],
                },
                Block::Table {
                    heading: "Options in -o".into(),
                    rows: vec![
                        ("x=1".into(), "one more".into()),
                        ("y".into(), "two".into())
                    ],
                },
                Block::Text("Plain text and more.".into()),
            ]
        );
    }

    #[test]
    fn man_page_lists_every_command_and_option() {
        let page = String::from_utf8(man_page()).unwrap();
        for word in [
            "lowerdir",
            "upperdir",
            "workdir",
            "userxattr",
            "squash_to_root",
            "uidmapping",
            "MOUNT OPTIONS",
            "FSTAB",
            "fuse.layerfs",
        ] {
            assert!(page.contains(word), "man page lacks {word}");
        }
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let ss = format!(".SS \"layerfs {}\"", sub.get_name());
            assert!(page.contains(&ss), "man page lacks {ss}");
        }
        assert!(
            !page.contains(".SS \"layerfs generate\""),
            "hidden command shown"
        );
    }
}
