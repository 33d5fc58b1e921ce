//! One module per subcommand.

/// `println!` for the subcommands' output, in a function that returns `anyhow::Result`: a
/// failed write is an error the function returns, where `println!` panics. A reader that went
/// away (`fulcrum ctl nodes | head -1`) is [`StdoutClosed`], which `main` ends on quietly.
macro_rules! outln {
    () => {
        $crate::cmd::write_line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::cmd::write_line(format_args!($($arg)*))?
    };
}

/// Standard output's reader closed its end (`EPIPE`): nothing more can be shown, and it is not
/// a failure of the command (the reader had what it wanted).
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes one line to standard output, mapping a closed pipe to [`StdoutClosed`].
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(e).context("writing to standard output"),
        })
}

pub(crate) mod control;
pub(crate) mod ctl;
pub(crate) mod load;
pub(crate) mod node_sim;
pub(crate) mod router;
pub(crate) mod task;
pub(crate) mod token;
pub(crate) mod up;

/// A gRPC status as a command's error: its code and message, as written (a status's own
/// `Display` quotes the message and spells the code out).
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Binds the metrics listener of `--metrics-listen`, when given.
pub(crate) async fn bind_metrics(
    addr: Option<&str>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    use anyhow::Context as _;
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} for metrics"))?;
    Ok(Some(listener))
}

/// A credential a control plane accepts: one token, or several comma-separated during a
/// rotation (`new,old`: either is accepted).
pub(crate) fn accepted_tokens(s: &str) -> Result<String, String> {
    let tokens = s
        .split(',')
        .map(token)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{e} (tokens are separated by commas)"))?;
    Ok(tokens.join(","))
}

/// The token a client presents: the first of a comma-separated list, so one value (`new,old`)
/// can be given to control planes and to their clients alike during a rotation.
pub(crate) fn presented_token(s: &str) -> Result<String, String> {
    let first = s.split(',').next().unwrap_or_default();
    token(first).map_err(|e| format!("{e} (the first of the comma-separated tokens is presented)"))
}

/// A bearer token from a flag or the environment: one or more visible ASCII characters, since
/// it travels in an HTTP/2 header (`authorization: Bearer <token>`); anything else could never
/// be presented, so it is refused at start rather than on every connection.
pub(crate) fn token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the token is empty".into());
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "the token holds {c:?}: only visible ASCII characters can travel in a header"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_visible_ascii() {
        assert_eq!(super::token("s3cr3t-_.~+/="), Ok("s3cr3t-_.~+/=".into()));
        assert!(super::token("").unwrap_err().contains("empty"));
        assert!(super::token("two words").unwrap_err().contains("' '"));
        assert!(super::token("naïve").unwrap_err().contains("'ï'"));
    }

    #[test]
    fn rotations_list_tokens_and_clients_present_the_first() {
        assert_eq!(super::accepted_tokens("n3w,0ld"), Ok("n3w,0ld".into()));
        assert_eq!(super::accepted_tokens("only"), Ok("only".into()));
        assert!(
            super::accepted_tokens("n3w,")
                .unwrap_err()
                .contains("empty")
        );
        assert!(super::accepted_tokens("a,b c").unwrap_err().contains("' '"));
        assert_eq!(super::presented_token("n3w,0ld"), Ok("n3w".into()));
        assert_eq!(super::presented_token("only"), Ok("only".into()));
        assert!(
            super::presented_token(",0ld")
                .unwrap_err()
                .contains("empty")
        );
    }
}
