"""offrl's own ManiSkill tasks: the paired pick-and-place tasks of reverse-to-forward imitation.

* ``offrl/PickPlaceB-v1`` (the easy task): the cube starts on a fixed target ring; place it on a goal drawn
  uniformly from a table region.
* ``offrl/PickPlaceA-v1`` (the hard task): the cube starts anywhere in that region; place it on the target.

Both run on the Panda table scene of ManiSkill's PickCube-v1 with a 4 cm cube. The target ring (red and
white) and the goal marker (a green disc) are visual only: kinematic actors without colliders. They share one
class, so their observations have the same layout (41 values in ``obs_mode=state``)::

    agent/qpos [9], agent/qvel [9], extra/tcp_pose [7], extra/goal_pos [3], extra/obj_pose [7],
    extra/tcp_to_obj_pos [3], extra/obj_to_goal_pos [3]

The goal of A is the target (so ``goal_pos`` is constant there). There is no contact-based ``is_grasped``
entry: contact forces are not part of a saved simulator state, and every quantity these tasks observe or
judge must follow from ``get_state_dict`` alone (offrl restores states for MC re-rollouts, reverses them in
``offrl data reverse`` and hands them from one task to the other in ``offrl alternate``).

**Success** (:meth:`PickPlaceEnv.evaluate`), a function of the state only: the cube's centre lies within
``distance_threshold`` (xy) of the goal, the cube rests on the table (centre within 5 mm of its resting
height, speed below 5 cm/s) and the arm is back home and still (tool-centre point within ``home_distance`` of
``home_xyz``, the rest pose's 17 cm above the table centre, far from the cube, so it is released; every arm
joint slower than ``static_speed`` rad/s, ManiSkill's ``is_static`` rule). An episode therefore ends the way the
other task starts: cube on the table, arm at rest. That is what makes the tasks chain without resets, and what
makes a reversed B episode start like an A episode (a moving arm at the start of reversed data is a state an
A policy never meets: measured, a policy trained on such data solved 1-3% of A).

**Settings** (``env.kwargs`` in an offrl config, or ``gym.make`` keywords): ``target_xy`` (the ring's centre),
``region`` (``[xmin, xmax, ymin, ymax]`` of A's starts and B's goals), ``distance_threshold``,
``home_xyz``, ``home_distance``, ``static_speed``, ``target_noise`` (B's start: uniform jitter of the cube
around the target, per axis, 5 mm; the reversed data places the cube as precisely on A's target. 2 cm, so that
B's starts would cover where A's successes leave the cube, halved A's success from reversed data and did not
make B any better in the alternating test: see README "Reverse-to-forward").

Importing this module registers both ids (``offrl.envs.maniskill`` imports it before building any env).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

TASK_A = "offrl/PickPlaceA-v1"
TASK_B = "offrl/PickPlaceB-v1"
#: the defaults of the settings above (also the documentation of their meaning)
DEFAULTS = {"target_xy": (0.0, 0.12), "region": (-0.1, 0.1, -0.15, 0.03), "distance_threshold": 0.025,
            "home_xyz": (0.0, 0.0, 0.17), "home_distance": 0.06, "static_speed": 0.2, "target_noise": 0.005}
CUBE_HALF = 0.02
REST_TOL = 0.005       # m: cube centre within this of its resting height counts as on the table
REST_SPEED = 0.05      # m/s: cube slower than this counts as resting


def _check_settings(target_xy: Sequence[float], region: Sequence[float], distance_threshold: float,
                    home_xyz: Sequence[float], home_distance: float, target_noise: float) -> None:
    from offrl.errors import OffrlError

    if len(target_xy) != 2 or len(region) != 4 or len(home_xyz) != 3:
        raise OffrlError(f"pick-and-place: target_xy needs 2 values, region 4 ([xmin, xmax, ymin, ymax]) and "
                         f"home_xyz 3, got {list(target_xy)}, {list(region)} and {list(home_xyz)}")
    vals = [*target_xy, *region, *home_xyz, distance_threshold, home_distance, target_noise]
    if not all(np.isfinite(float(v)) for v in vals):
        raise OffrlError(f"pick-and-place settings must be finite, got {vals}")
    if region[0] >= region[1] or region[2] >= region[3]:
        raise OffrlError(f"pick-and-place region must have xmin < xmax and ymin < ymax, got {list(region)}")
    if distance_threshold <= 0 or home_distance <= 0 or target_noise < 0:
        raise OffrlError("pick-and-place: distance_threshold and home_distance must be > 0 and target_noise "
                         f">= 0, got {distance_threshold}, {home_distance}, {target_noise}")


def task_success(cube_pos: np.ndarray, cube_vel: np.ndarray, tcp_pos: np.ndarray, goal_xy: np.ndarray,
                 distance_threshold: float, home_xyz: Sequence[float], home_distance: float,
                 arm_qvel: Optional[np.ndarray] = None, static_speed: float = DEFAULTS["static_speed"]) -> np.ndarray:
    """The success rule of both tasks on arrays ``[..., 3]`` (``goal_xy`` ``[..., 2]``, ``arm_qvel`` ``[..., 7]``,
    None: still); see the module doc."""
    placed = np.linalg.norm(cube_pos[..., :2] - goal_xy, axis=-1) <= distance_threshold
    resting = (np.abs(cube_pos[..., 2] - CUBE_HALF) <= REST_TOL) & (np.linalg.norm(cube_vel, axis=-1) <= REST_SPEED)
    home = np.linalg.norm(tcp_pos - np.asarray(home_xyz), axis=-1) <= home_distance
    still = True if arm_qvel is None else np.abs(arm_qvel).max(-1) <= static_speed
    return placed & resting & home & still


def _register() -> None:
    import sapien
    import torch
    from mani_skill.envs.sapien_env import BaseEnv
    from mani_skill.envs.utils import randomization
    from mani_skill.utils.building import actors
    from mani_skill.utils.registration import REGISTERED_ENVS, register_env
    from mani_skill.utils.scene_builder.table import TableSceneBuilder
    from mani_skill.utils.structs.pose import Pose

    if TASK_A in REGISTERED_ENVS:
        return
    upright = [0.7071068, 0.0, 0.7071068, 0.0]  # a ManiSkill cylinder lies along x: stand it on the table

    class PickPlaceEnv(BaseEnv):
        """Pick the cube and place it on the goal (see :mod:`offrl.envs.tasks`). ``task``: ``"A"`` or ``"B"``."""

        SUPPORTED_ROBOTS = ["panda"]
        SUPPORTED_REWARD_MODES = ["normalized_dense", "dense", "sparse", "none"]
        task = "A"

        def __init__(self, *args: Any, robot_uids: str = "panda", robot_init_qpos_noise: float = 0.02,
                     target_xy: Sequence[float] = DEFAULTS["target_xy"], region: Sequence[float] = DEFAULTS["region"],
                     distance_threshold: float = DEFAULTS["distance_threshold"],
                     home_xyz: Sequence[float] = DEFAULTS["home_xyz"], home_distance: float = DEFAULTS["home_distance"],
                     static_speed: float = DEFAULTS["static_speed"], target_noise: float = DEFAULTS["target_noise"],
                     **kwargs: Any):
            _check_settings(target_xy, region, distance_threshold, home_xyz, home_distance, target_noise)
            if not (np.isfinite(static_speed) and static_speed > 0):
                from offrl.errors import OffrlError

                raise OffrlError(f"pick-and-place: static_speed must be finite and > 0, got {static_speed}")
            self.static_speed = float(static_speed)
            self.robot_init_qpos_noise = robot_init_qpos_noise
            self.target_xy = tuple(float(v) for v in target_xy)
            self.region = tuple(float(v) for v in region)
            self.distance_threshold = float(distance_threshold)
            self.home_xyz = tuple(float(v) for v in home_xyz)
            self.home_distance = float(home_distance)
            self.target_noise = float(target_noise)
            super().__init__(*args, robot_uids=robot_uids, **kwargs)

        @property
        def _default_sensor_configs(self):
            return []

        @property
        def _default_human_render_camera_configs(self):
            from mani_skill.sensors.camera import CameraConfig
            from mani_skill.utils import sapien_utils

            pose = sapien_utils.look_at(eye=[0.6, 0.7, 0.6], target=[0.0, 0.0, 0.1])
            return CameraConfig("render_camera", pose, 512, 512, 1, 0.01, 100)

        def _load_agent(self, options: dict):
            super()._load_agent(options, sapien.Pose(p=[-0.615, 0, 0]))

        def _load_scene(self, options: dict):
            self.table_scene = TableSceneBuilder(self, robot_init_qpos_noise=self.robot_init_qpos_noise)
            self.table_scene.build()
            self.cube = actors.build_cube(self.scene, half_size=CUBE_HALF, color=[1, 0, 0, 1], name="cube",
                                          initial_pose=sapien.Pose(p=[0, 0, CUBE_HALF]))
            self.target_ring = actors.build_red_white_target(
                self.scene, radius=self.distance_threshold + CUBE_HALF, thickness=1e-3, name="target_ring",
                body_type="kinematic", add_collision=False,
                initial_pose=sapien.Pose(p=[*self.target_xy, 1e-3], q=upright))
            self.goal_site = actors.build_cylinder(
                self.scene, radius=self.distance_threshold, half_length=1e-3, color=[0, 1, 0, 1],
                name="goal_site", body_type="kinematic", add_collision=False,
                initial_pose=sapien.Pose(p=[0, 0, 2e-3], q=upright))

        def _sample_region(self, b: int) -> torch.Tensor:
            x0, x1, y0, y1 = self.region
            xy = torch.rand((b, 2))
            return torch.stack([x0 + (x1 - x0) * xy[:, 0], y0 + (y1 - y0) * xy[:, 1]], dim=1)

        def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
            with torch.device(self.device):
                b = len(env_idx)
                self.table_scene.initialize(env_idx)
                target = torch.tensor(self.target_xy).expand(b, 2)
                if self.task == "A":
                    cube_xy, goal_xy = self._sample_region(b), target
                else:
                    jitter = (torch.rand((b, 2)) * 2 - 1) * self.target_noise
                    cube_xy, goal_xy = target + jitter, self._sample_region(b)
                xyz = torch.zeros((b, 3))
                xyz[:, :2] = cube_xy
                xyz[:, 2] = CUBE_HALF
                qs = randomization.random_quaternions(b, lock_x=True, lock_y=True)
                self.cube.set_pose(Pose.create_from_pq(xyz, qs))
                g = torch.zeros((b, 3))
                g[:, :2] = goal_xy
                g[:, 2] = 2e-3
                self.goal_site.set_pose(Pose.create_from_pq(g, torch.tensor(upright).expand(b, 4)))

        def _get_obs_extra(self, info: dict):
            goal = self.goal_site.pose.p.clone()
            goal[:, 2] = CUBE_HALF  # where the cube's centre rests when placed
            obs = dict(tcp_pose=self.agent.tcp_pose.raw_pose, goal_pos=goal)
            if "state" in self.obs_mode:
                obs.update(obj_pose=self.cube.pose.raw_pose, tcp_to_obj_pos=self.cube.pose.p - self.agent.tcp_pose.p,
                           obj_to_goal_pos=goal - self.cube.pose.p)
            return obs

        def evaluate(self):
            cube = self.cube.pose.p
            goal_xy = self.goal_site.pose.p[:, :2]
            d_goal = torch.linalg.norm(cube[:, :2] - goal_xy, dim=1)
            placed = d_goal <= self.distance_threshold
            resting = ((cube[:, 2] - CUBE_HALF).abs() <= REST_TOL) & \
                (torch.linalg.norm(self.cube.linear_velocity, dim=1) <= REST_SPEED)
            d_tcp = torch.linalg.norm(self.agent.tcp_pose.p - cube, dim=1)
            d_home = torch.linalg.norm(self.agent.tcp_pose.p - torch.tensor(self.home_xyz, device=cube.device), dim=1)
            home = d_home <= self.home_distance
            still = self.agent.is_static(self.static_speed)
            return {"success": placed & resting & home & still, "is_obj_placed": placed & resting, "is_home": home,
                    "is_robot_static": still,
                    "goal_distance": d_goal, "tcp_distance": d_tcp, "home_distance": d_home}

        def compute_dense_reward(self, obs: Any, action: torch.Tensor, info: dict):
            """Stages, each worth 1: reach the cube; carry it over the goal; set it down; let go and go back
            home; success is worth 5 (so ``normalized_dense`` is this / 5)."""
            cube = self.cube.pose.p
            d_tcp = info["tcp_distance"]
            placed = info["is_obj_placed"]
            near = d_tcp < 0.03
            reach = torch.where(placed, torch.ones_like(d_tcp), 1 - torch.tanh(10 * d_tcp))
            over_goal = (1 - torch.tanh(10 * info["goal_distance"])) * (near | placed)
            lowered = (1 - torch.tanh(20 * (cube[:, 2] - CUBE_HALF).abs())) * (info["goal_distance"] < 0.03)
            back = placed * (1 - torch.tanh(5 * info["home_distance"])) * (d_tcp > 0.03)
            reward = reach + over_goal + lowered + back
            reward[info["success"]] = 5.0
            return reward

        def compute_normalized_dense_reward(self, obs: Any, action: torch.Tensor, info: dict):
            return self.compute_dense_reward(obs=obs, action=action, info=info) / 5.0

    @register_env(TASK_A, max_episode_steps=100)
    class PickPlaceAEnv(PickPlaceEnv):
        """Task A (hard): the cube starts anywhere in the region; place it on the fixed target ring."""

        task = "A"

    @register_env(TASK_B, max_episode_steps=100)
    class PickPlaceBEnv(PickPlaceEnv):
        """Task B (easy): the cube starts on the target ring; place it on a goal drawn from the region."""

        task = "B"

    global ENV_CLASSES
    ENV_CLASSES = {TASK_A: PickPlaceAEnv, TASK_B: PickPlaceBEnv}


ENV_CLASSES: dict[str, Any] = {}
_register()
