//! `vmsdk detect`: the systemd-detect-virt interface, with the evidence on request.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vmsdk::detect::{
    ConfidentialVm, Detector, DevCpuMsr, NativeCpuid, RecordedCpuid, MSR_AMD64_SEV_STATUS,
};

use crate::CliResult;

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Only detect a virtual machine.
    #[arg(long, conflicts_with = "container")]
    vm: bool,
    /// Only detect a container.
    #[arg(long)]
    container: bool,
    /// Only detect a confidential VM (sev, sev-es, sev-snp, tdx, protvirt, cca).
    #[arg(long, conflicts_with_all = ["vm", "container"])]
    cvm: bool,
    /// Print nothing; only the exit code tells (0 = virtualized).
    #[arg(short, long)]
    quiet: bool,
    /// Print the answer with its evidence as JSON.
    #[arg(long, conflicts_with = "quiet")]
    json: bool,
    /// Read /proc, /sys, /run ... under this directory (a fixture tree or a mounted image).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Print this processor's CPUID leaves (and the SEV_STATUS MSR where it can be read) in the
    /// fixture format and exit.
    #[arg(long, conflicts_with_all = ["vm", "container", "cvm", "json", "root"])]
    dump_cpuid: bool,
    /// List every word detection can answer with.
    #[arg(long, conflicts_with_all = ["vm", "container", "cvm", "json", "root", "dump_cpuid"])]
    list: bool,
    /// List every word confidential-VM detection can answer with.
    #[arg(
        long,
        conflicts_with_all = ["vm", "container", "cvm", "json", "root", "dump_cpuid", "list"]
    )]
    list_cvm: bool,
}

pub fn run(args: &DetectArgs) -> CliResult {
    if args.dump_cpuid {
        let recording = RecordedCpuid::capture(&NativeCpuid);
        // SEV_STATUS needs the msr module and root; without them the recording has no MSR.
        let recording = match recording
            .clone()
            .capture_msr(&DevCpuMsr::new(), MSR_AMD64_SEV_STATUS)
        {
            Ok(with_msr) => with_msr,
            Err(_) => recording,
        };
        print!("{recording}");
        return Ok(ExitCode::SUCCESS);
    }
    // Both lists start with `none`, as systemd-detect-virt's do.
    if args.list {
        let vms = vmsdk::Hypervisor::ALL.iter().map(|h| h.as_str());
        let containers = vmsdk::Container::ALL.iter().map(|c| c.as_str());
        for word in std::iter::once("none").chain(vms).chain(containers) {
            println!("{word}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.list_cvm {
        let cvms = ConfidentialVm::ALL.iter().map(|c| c.as_str());
        for word in std::iter::once("none").chain(cvms) {
            println!("{word}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let detector = match &args.root {
        Some(root) => Detector::new().with_root(root)?,
        None => Detector::new(),
    };
    // Like systemd-detect-virt, each side runs only the probes it needs.
    let (word, found, json) = if args.vm {
        let (vm, evidence) = detector.detect_vm();
        let word = vm.map_or_else(|| "none".to_owned(), |h| h.to_string());
        let json = serde_json::json!({ "vm": vm, "evidence": evidence });
        (word, vm.is_some(), json)
    } else if args.container {
        let (container, evidence) = detector.detect_container();
        let word = container.map_or_else(|| "none".to_owned(), |c| c.to_string());
        let json = serde_json::json!({ "container": container, "evidence": evidence });
        (word, container.is_some(), json)
    } else if args.cvm {
        let (cvm, evidence) = detector.detect_cvm();
        let word = cvm.map_or_else(|| "none".to_owned(), |c| c.to_string());
        let json = serde_json::json!({ "cvm": cvm, "evidence": evidence });
        (word, cvm.is_some(), json)
    } else {
        let detection = detector.detect();
        let found = detection.vm.is_some() || detection.container.is_some();
        let word = detection.virtualization();
        let mut json = serde_json::to_value(&detection)?;
        json["virtualization"] = serde_json::Value::String(word.clone());
        (word, found, json)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else if !args.quiet {
        println!("{word}");
    }
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
