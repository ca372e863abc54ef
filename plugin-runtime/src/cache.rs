//! Compiled components cached on disk, so a restart (or each test process)
//! does not pay Cranelift again. Files are named by the component's SHA-256
//! and the engine's compatibility hash, written atomically into a directory
//! the host creates private to its user, and only ever read from there:
//! deserializing is `unsafe` in wasmtime because a forged file could carry
//! any machine code, so nothing that arrived from outside is deserialized.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct ComponentCache {
    dir: PathBuf,
}

impl ComponentCache {
    pub fn new(dir: PathBuf) -> ComponentCache {
        ComponentCache { dir }
    }

    pub fn load_or_compile(&self, engine: &Engine, bytes: &[u8], sha256: &[u8; 32]) -> anyhow::Result<Component> {
        let path = self.path(engine, sha256);
        if self.is_private() && path.exists() {
            let artifact = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            // SAFETY: the file is in a directory only this user can write,
            // named by the hash of the component it was compiled from, and
            // written by `store` below; wasmtime rejects artifacts from
            // another version or configuration with an error.
            match unsafe { Component::deserialize(engine, &artifact) } {
                Ok(component) => return Ok(component),
                Err(err) => tracing::warn!("ignoring cached component {}: {err}", path.display()),
            }
        }
        let component = Component::from_binary(engine, bytes).map_err(anyhow::Error::from)?;
        if let Err(err) = self.store(&path, &component) {
            tracing::warn!("could not cache the compiled component: {err:#}");
        }
        Ok(component)
    }

    fn path(&self, engine: &Engine, sha256: &[u8; 32]) -> PathBuf {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let sha: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{sha}-{:016x}.cwasm", hasher.finish()))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        create_private_dir(&self.dir)?;
        let artifact = component.serialize().map_err(anyhow::Error::from)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&artifact)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Only a directory this user owns, and no other user can write to, is
    /// trusted: mode bits alone would trust a 0755 directory of another
    /// user, who could plant an artifact there.
    fn is_private(&self) -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            fs::metadata(&self.dir).is_ok_and(|m| m.is_dir() && m.uid() == me && m.permissions().mode() & 0o022 == 0)
        }
        #[cfg(not(unix))]
        {
            self.dir.is_dir()
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Regression: the directory was trusted by its mode bits alone.
    #[test]
    fn a_directory_of_another_user_is_not_trusted() {
        let dir = std::env::temp_dir().join(format!("plugin-cache-owner-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let cache = ComponentCache::new(dir.clone());
        assert!(cache.is_private(), "our own 0755 directory");
        // Give it to `nobody`; only root may, so elsewhere there is nothing to show.
        let nobody = 65534;
        // SAFETY: chown on a path we created, with a NUL-terminated copy.
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::chown(path.as_ptr(), nobody, nobody) } == 0 {
            assert!(!cache.is_private(), "another user's 0755 directory was trusted");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!cache.is_private(), "a world-writable directory was trusted");
        fs::remove_dir_all(&dir).ok();
    }
}
