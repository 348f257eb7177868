//! `certo catalogue`: the release × platform × node type matrix.

use std::process::ExitCode;

use clap::Args;

use super::{Global, print_json};

#[derive(Debug, Args)]
pub struct CatalogueArgs {
    /// Print the catalogue as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, args: CatalogueArgs) -> anyhow::Result<ExitCode> {
    let catalogue = g.catalogue()?;
    if args.json {
        print_json(&catalogue)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("Platforms:");
    for p in &catalogue.platforms {
        let recipe = match &p.recipe {
            certo_orchestrator::catalogue::Recipe::Mmdebstrap { suite, arch, .. } => {
                format!("mmdebstrap {suite} ({arch})")
            }
            certo_orchestrator::catalogue::Recipe::Dnf {
                repository, arch, ..
            } => {
                format!("dnf from {repository} ({arch})")
            }
        };
        println!(
            "  {:<14} {} packages ({})  core: {recipe}",
            p.label,
            p.family,
            p.package_archs.join(", ")
        );
    }
    for r in &catalogue.releases {
        println!();
        println!("{} — node types × platforms:", r.label);
        print!("  {:<14}", "");
        for p in &r.platforms {
            print!(" {p:<13}");
        }
        println!();
        for n in &r.node_types {
            print!("  {:<14}", n.name);
            for p in &r.platforms {
                print!(" {:<13}", if n.available_on(r, p) { "yes" } else { "-" });
            }
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}
