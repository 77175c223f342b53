use std::process::ExitCode;

use clap::Parser as _;
use lb_agent::{
    cli::{Cli, Command, DecapAction},
    config::Config,
    ctl,
    dataplane::fast_path,
    decap, run,
};

/// `lb-agent detach --config FILE`: with `[bgp]`, withdraw the VIPs and wait `drain_s`
/// before the fast path goes; a withdrawal BIRD did not take stops the detach.
fn withdraw_first(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = config else {
        return Ok(());
    };
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(bgp) = &config.bgp {
        lb_agent::bgp::withdraw_all(bgp).map_err(|e| {
            anyhow::anyhow!("withdrawing the VIPs first: {e}; the fast path stays attached")
        })?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = lb_agent::logging::init();
    let result = match cli.command {
        Command::CheckConfig { config } => {
            return match Config::load(&config) {
                Ok(c) => {
                    println!(
                        "{}: OK ({} service{})",
                        config.display(),
                        c.services.len(),
                        if c.services.len() == 1 { "" } else { "s" }
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run {
            config,
            iface,
            xdp_mode,
            bpffs,
            api,
            state_dir,
            detach_on_exit,
        } => run::run(run::RunArgs {
            config,
            iface,
            xdp_mode,
            bpffs,
            api,
            state_dir,
            detach_on_exit,
        }),
        Command::Decap { action } => match action {
            DecapAction::Attach {
                iface,
                bpffs,
                addresses,
                xdp_mode,
                gue_port,
            } => decap::attach(&iface, &bpffs, &addresses, xdp_mode, gue_port),
            DecapAction::Detach { iface, bpffs } => decap::detach(&iface, &bpffs),
        },
        Command::Detach {
            iface,
            bpffs,
            config,
        } => withdraw_first(config.as_deref()).and_then(|()| fast_path::detach(&iface, &bpffs)),
        Command::Ctl { api, token, cmd } => ctl::run(&api, token.as_deref(), cmd),
    };
    // Write out the buffered log before the error line below.
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
