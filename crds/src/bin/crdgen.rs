//! Prints a generated CRD: `crdgen` (DsrService), `crdgen dsrnodereport`,
//! or writes every CRD into a directory with `crdgen --write crds`.

#![forbid(unsafe_code)]

use kube_dsr_crds::{Crd, Error};

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => print!("{}", Crd::DsrService.yaml()?),
        [flag, dir] if flag == "--write" => {
            for crd in Crd::ALL {
                let path = format!("{dir}/{}", crd.file_name());
                std::fs::write(&path, crd.yaml()?)
                    .map_err(|source| Error::Write { path, source })?;
            }
        }
        [name] => {
            let crd = Crd::ALL
                .into_iter()
                .find(|c| c.file_name().trim_end_matches(".yaml") == name)
                .ok_or_else(|| Error::UnknownCrd(name.clone()))?;
            print!("{}", crd.yaml()?);
        }
        _ => return Err(Error::UnknownCrd(args.join(" "))),
    }
    Ok(())
}
